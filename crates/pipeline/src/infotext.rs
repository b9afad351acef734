//! A1111's infotext, the "parameters" text a PNG carries: written here for every image the
//! engine makes (and for the server's post-processing), and read back with the semantics of
//! A1111's `parse_generation_parameters` (`modules/infotext_utils.py`).
//!
//! The layout is the prompt, an optional `Negative prompt: …` line, then one line of
//! `Key: value` pairs joined by `, `; a value holding `,`, `:` or a newline is written as a
//! JSON string (A1111's `quote`).

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use sdkube_models::Family;

use crate::generate::Request;
use crate::hires::{HiresFix, HiresSize};
use crate::sampler::SamplerSpec;

/// A1111's `re_param`: a key of word characters, spaces, `-` and `/`; a value that is a quoted
/// JSON string or anything up to the next comma.
static PARAM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("valid regex")
});
/// A1111's `re_imagesize`: a `WxH` value, which the parser splits into `Key-1` and `Key-2`.
static IMAGE_SIZE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(\d+)x(\d+)$").expect("valid regex"));

/// The generation parameters of one image, in A1111's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Infotext {
    /// The prompt, as typed.
    pub prompt: String,
    /// The negative prompt (no line is written when empty).
    pub negative_prompt: String,
    /// `Key: value` pairs in the order they are written; values unquoted.
    pub fields: Vec<(String, String)>,
}

impl Infotext {
    /// An infotext with a prompt and no fields yet.
    pub fn new(prompt: &str, negative_prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            fields: Vec::new(),
        }
    }

    /// Adds `key: value` at the end, or replaces the value where `key` already is.
    pub fn push(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        let value = value.to_string();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.fields.push((key.to_string(), value)),
        }
        self
    }

    /// Adds `key: value` right after `anchor` (at the end when `anchor` is absent), as A1111
    /// places fields that post-processing adds.
    pub fn insert_after(&mut self, anchor: &str, key: &str, value: impl fmt::Display) -> &mut Self {
        self.remove(key);
        let at = self
            .fields
            .iter()
            .position(|(k, _)| k == anchor)
            .map_or(self.fields.len(), |i| i + 1);
        self.fields.insert(at, (key.to_string(), value.to_string()));
        self
    }

    /// The value of `key`, unquoted.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(i).1)
    }

    /// The `Key: value, …` line alone (what A1111's extras write).
    pub fn fields_line(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| match k == v {
                true => k.clone(),
                false => format!("{k}: {}", quote(v)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Reads an infotext as A1111's `parse_generation_parameters` does: the last line holds
    /// the fields when at least three `Key: value` pairs are found on it; the lines before
    /// are the prompt, and from a line starting with `Negative prompt:` on, the negative
    /// prompt (each line trimmed). Quoted values are unquoted.
    pub fn parse(text: &str) -> Self {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let mut last = lines.pop().unwrap_or("");
        if PARAM.captures_iter(last).count() < 3 {
            lines.push(last);
            last = "";
        }
        let (mut prompt, mut negative, mut in_negative) = (String::new(), String::new(), false);
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                line = rest.trim();
            }
            let target = if in_negative {
                &mut negative
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        let fields = PARAM
            .captures_iter(last)
            .map(|c| (c[1].to_string(), unquote(&c[2])))
            .collect();
        Self {
            prompt,
            negative_prompt: negative,
            fields,
        }
    }

    /// A1111's dictionary of the parsed text: `Prompt`, `Negative prompt`, then each field,
    /// a `WxH` value split into `Key-1` and `Key-2` (as `Size-1`, `Size-2`).
    pub fn parameters(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("Prompt".to_string(), self.prompt.clone()),
            ("Negative prompt".to_string(), self.negative_prompt.clone()),
        ];
        for (k, v) in &self.fields {
            match IMAGE_SIZE.captures(v) {
                Some(c) => {
                    out.push((format!("{k}-1"), c[1].to_string()));
                    out.push((format!("{k}-2"), c[2].to_string()));
                }
                None => out.push((k.clone(), v.clone())),
            }
        }
        out
    }
}

impl fmt::Display for Infotext {
    /// Prompt, `Negative prompt: …` when there is one, then the fields line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prompt)?;
        if !self.negative_prompt.is_empty() {
            write!(f, "\nNegative prompt: {}", self.negative_prompt)?;
        }
        write!(f, "\n{}", self.fields_line())
    }
}

/// A1111's `quote`: a value holding `,`, `:` or a newline becomes a JSON string.
pub fn quote(value: &str) -> String {
    if !value.contains([',', ':', '\n']) {
        return value.to_string();
    }
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// A1111's `unquote`: a value in double quotes is read as a JSON string (kept as it is when
/// that fails).
pub fn unquote(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(value) {
            return s;
        }
    }
    value.to_string()
}

/// What the infotext of one generated image records beyond its request.
#[derive(Debug, Clone, Copy)]
pub struct ImageInfo<'a> {
    /// The sampler and schedule the request resolved to.
    pub spec: &'a SamplerSpec,
    /// The image's seed.
    pub seed: u64,
    /// The image's variation seed (written when the request's strength is not 0).
    pub subseed: u64,
    /// The checkpoint's name.
    pub model: &'a str,
    /// The checkpoint's family (SDXL writes no clip skip).
    pub family: Family,
    /// `name: hash` of each textual-inversion embedding used.
    pub ti_hashes: &'a [String],
    /// `name: hash` of each LoRA the prompt names.
    pub lora_hashes: &'a [String],
    /// The hires fix run after the first pass, if any.
    pub hires: Option<&'a HiresFix>,
}

/// The infotext of an image made from `req`, fields in A1111's `create_infotext` order.
pub fn generation(req: &Request, info: &ImageInfo<'_>) -> Infotext {
    let mut t = Infotext::new(&req.prompt, &req.negative_prompt);
    t.push("Steps", req.steps);
    t.push("Sampler", info.spec.sampler.name());
    t.push("Schedule type", info.spec.scheduler.label());
    t.push("CFG scale", req.cfg_scale);
    t.push("Seed", info.seed);
    t.push("Size", format!("{}x{}", req.width, req.height));
    t.push("Model", info.model);
    if req.subseed_strength != 0.0 {
        t.push("Variation seed", info.subseed);
        t.push("Variation seed strength", req.subseed_strength);
    }
    if let Some((w, h)) = req.seed_resize_from {
        t.push("Seed resize from", format!("{w}x{h}"));
    }
    match info.hires {
        Some(h) => t.push("Denoising strength", h.denoising_strength),
        None if req.init_image.is_some() => t.push("Denoising strength", req.strength),
        None => &mut t,
    };
    if req.clip_skip > 1 && !matches!(info.family, Family::Sdxl | Family::SdxlRefiner) {
        t.push("Clip skip", req.clip_skip);
    }
    if req.tiling {
        t.push("Tiling", "True");
    }
    if let Some(h) = info.hires {
        // As A1111 writes them: the scale as Python prints a float, steps only when given.
        match h.size {
            HiresSize::Scale(s) => t.push("Hires upscale", format!("{s:?}")),
            HiresSize::Resize(w, h) => t.push("Hires resize", format!("{w}x{h}")),
        };
        if h.steps != 0 {
            t.push("Hires steps", h.steps);
        }
        t.push("Hires upscaler", &h.upscaler);
    }
    if req.mask.is_some() {
        t.push("Mask blur", req.mask_blur);
    }
    if let Some(r) = &req.refiner {
        t.push("Refiner", &r.checkpoint);
        t.push("Refiner switch at", r.switch_at);
    }
    if req.step_caching.is_on() {
        t.push("Step cache interval", req.step_caching.interval);
        t.push("Step cache branch", req.step_caching.branch);
    }
    if !info.lora_hashes.is_empty() {
        t.push("Lora hashes", info.lora_hashes.join(", "));
    }
    if !info.ti_hashes.is_empty() {
        t.push("TI hashes", info.ti_hashes.join(", "));
    }
    t.push("Version", format!("sdkube {}", env!("CARGO_PKG_VERSION")));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Infotext {
        let mut t = Infotext::new("a cat, (fluffy:1.2)\nsecond line", "dog\nugly");
        t.push("Steps", 20)
            .push("Sampler", "DPM++ 2M")
            .push("CFG scale", 5.5)
            .push("Seed", 77)
            .push("Size", "512x768")
            .push("Model", "my: model, v2")
            .push("TI hashes", "emb: 0123abcd, other: ffee0011")
            .push("Note", "a \"quoted\", value\nover two lines")
            .push("Version", "sdkube 0.1.0");
        t
    }

    #[test]
    fn writes_a1111_layout_and_quotes_values_with_commas_or_colons() {
        let text = sample().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "a cat, (fluffy:1.2)");
        assert_eq!(lines[2], "Negative prompt: dog");
        assert!(lines[4].starts_with("Steps: 20, Sampler: DPM++ 2M, CFG scale: 5.5, Seed: 77"));
        assert!(text.contains(r#"Model: "my: model, v2""#), "{text}");
        assert!(text.contains(r#"TI hashes: "emb: 0123abcd, other: ffee0011""#));
        assert!(
            text.contains(r#"Note: "a \"quoted\", value\nover two lines""#),
            "{text}"
        );
    }

    #[test]
    fn parse_reads_back_what_was_written() {
        let written = sample();
        let text = written.to_string();
        let read = Infotext::parse(&text);
        assert_eq!(read, written);
        assert_eq!(read.to_string(), text);
    }

    #[test]
    fn parameters_split_sizes_as_a1111() {
        let p = Infotext::parse(&sample().to_string()).parameters();
        let get = |k: &str| p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Prompt"), Some("a cat, (fluffy:1.2)\nsecond line"));
        assert_eq!(get("Size-1"), Some("512"));
        assert_eq!(get("Size-2"), Some("768"));
        assert_eq!(get("Size"), None);
        assert_eq!(get("Steps"), Some("20"));
    }

    #[test]
    fn a_last_line_with_under_three_fields_is_prompt() {
        let t = Infotext::parse("a dog\nSteps: 20, Seed: 1");
        assert_eq!(t.prompt, "a dog\nSteps: 20, Seed: 1");
        assert!(t.fields.is_empty());
        // Extras: no prompt, only fields.
        let mut x = Infotext::default();
        x.push("Postprocess upscale by", 2)
            .push("Postprocess upscaler", "R-ESRGAN 4x+")
            .push("GFPGAN visibility", 0.5);
        let line = x.fields_line();
        assert_eq!(
            line,
            "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+, GFPGAN visibility: 0.5"
        );
        let read = Infotext::parse(&line);
        assert_eq!(read.fields, x.fields);
        assert_eq!(read.prompt, "");
    }

    #[test]
    fn negative_prompt_lines_and_blank_lines_follow_a1111() {
        let t = Infotext::parse(
            "  first\n\nsecond  \nNegative prompt:  bad\nworse\nSteps: 2, Seed: 3, Size: 8x8",
        );
        // A1111 trims each line and keeps a blank line inside the prompt.
        assert_eq!(t.prompt, "first\n\nsecond");
        assert_eq!(t.negative_prompt, "bad\nworse");
        assert_eq!(t.get("Seed"), Some("3"));
    }

    #[test]
    fn insert_after_places_post_processing_fields() {
        let mut t = sample();
        t.insert_after("Seed", "Face restoration", "GFPGAN");
        let keys: Vec<&str> = t.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[3..6], ["Seed", "Face restoration", "Size"]);
        t.insert_after("Missing", "Tail", 1);
        assert_eq!(t.fields.last().unwrap().0, "Tail");
    }
}
