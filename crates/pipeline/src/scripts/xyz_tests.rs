//! Tests of the X/Y/Z plot (kept apart: the axis table makes `xyz.rs` long).
use super::*;
use crate::infotext::Infotext;
use crate::Request;
use image::{Rgb, RgbImage};
use serde_json::json;

fn base() -> Cell {
    Cell {
        request: Request {
            prompt: "a red cat".into(),
            negative_prompt: "blurry red".into(),
            seed: 100,
            width: 64,
            height: 64,
            ..Request::default()
        },
        hires: None,
        checkpoint: None,
    }
}

fn no_seed() -> u64 {
    unreachable!("no seed is drawn here")
}

#[test]
fn axis_lists_are_a1111_1_10s_per_tab() {
    let t = axis_labels(Mode::Txt2Img);
    let i = axis_labels(Mode::Img2Img);
    assert_eq!(t.len(), 43);
    assert_eq!(i.len(), 42);
    assert_eq!(
        &t[..7],
        [
            "Nothing",
            "Seed",
            "Var. seed",
            "Var. strength",
            "Steps",
            "Hires steps",
            "CFG Scale"
        ]
    );
    assert_eq!(
        &i[..7],
        [
            "Nothing",
            "Seed",
            "Var. seed",
            "Var. strength",
            "Steps",
            "CFG Scale",
            "Image CFG Scale"
        ]
    );
    assert_eq!(t[9], "Sampler");
    assert_eq!(i[9], "Sampler");
    assert_eq!(t[11], "Checkpoint name");
    assert_eq!(t.iter().position(|l| *l == "Denoising"), Some(26));
    assert_eq!(i.iter().position(|l| *l == "Denoising"), Some(25));
    assert_eq!(i[10], "Checkpoint name");
    assert_eq!(t[7], "Prompt S/R");
    assert_eq!(t[42], "Size");
    assert_eq!(i[41], "Size");
}

#[test]
fn short_args_take_a1111_defaults_and_labels_work() {
    let p = XyzPlot::from_args(&[json!(4), json!("10,20")], Mode::Txt2Img).unwrap();
    assert_eq!(p.axes[0].axis, Axis::Steps);
    assert_eq!(p.axes[1].axis, Axis::Nothing);
    assert!(p.draw_legend && !p.include_lone_images && !p.no_fixed_seeds);
    let p = XyzPlot::from_args(&[json!("cfg scale"), json!("5, 7.5")], Mode::Img2Img).unwrap();
    assert_eq!(
        p.axes[0].values,
        vec![AxisValue::Float(5.0), AxisValue::Float(7.5)]
    );
    // The default X axis is Seed.
    let p = XyzPlot::from_args(&[], Mode::Txt2Img);
    assert!(p.unwrap_err().0.contains("no values"));
}

#[test]
fn bad_args_name_the_problem() {
    let err = |args: serde_json::Value, mode| {
        XyzPlot::from_args(args.as_array().unwrap(), mode)
            .unwrap_err()
            .0
    };
    assert!(err(json!(["Eta", "0.1"]), Mode::Txt2Img).contains("\"Eta\" is not supported"));
    assert!(err(json!([99, "1"]), Mode::Txt2Img).contains("script_args[0]"));
    assert!(err(json!(["Denoizing", "1"]), Mode::Txt2Img).contains("not an axis"));
    assert!(err(json!(["Steps", "ten"]), Mode::Txt2Img).contains("\"ten\""));
    assert!(err(
        json!(["Steps", "1-20", null, "Seed", "1-20"]),
        Mode::Txt2Img
    )
    .contains("limit"));
    assert!(err(json!(["Size", "512"]), Mode::Txt2Img).contains("WIDTHxHEIGHT"));
    assert!(err(
        json!([4, "10", null, 0, "", null, 0, "", null, "yes"]),
        Mode::Txt2Img
    )
    .contains("draw_legend"));
    // img2img has no "Hires steps".
    assert!(err(json!(["Hires steps", "10"]), Mode::Img2Img).contains("not an axis"));
    let too_many = serde_json::Value::Array(vec![json!(null); 19]);
    assert_eq!(
        err(too_many, Mode::Txt2Img),
        "script_args: X/Y/Z plot takes 18 arguments, got 19"
    );
}

#[test]
fn cells_run_z_then_y_then_x_and_land_x_fastest() {
    let args = json!([
        "Steps",
        "10,20",
        null,
        "CFG Scale",
        "5,7",
        null,
        "Seed",
        "1,2",
        null
    ]);
    let p = XyzPlot::from_args(args.as_array().unwrap(), Mode::Txt2Img).unwrap();
    let cells = p.cells(&base(), &mut no_seed).unwrap();
    let got: Vec<_> = cells.iter().map(|c| (c.index, c.at)).collect();
    assert_eq!(got[0], (0, [0, 0, 0]));
    assert_eq!(got[1], (1, [1, 0, 0]));
    assert_eq!(got[2], (2, [0, 1, 0]));
    assert_eq!(got[4], (4, [0, 0, 1]));
    let c = &cells[3].cell.request;
    assert_eq!((c.steps, c.cfg_scale, c.seed), (20, 7.0, 1));
    assert_eq!(cells[7].cell.request.seed, 2);
}

#[test]
fn a_checkpoint_axis_is_the_outer_loop() {
    let args = json!([
        "Steps",
        "1,2",
        null,
        "Checkpoint name",
        "",
        ["a.safetensors", "b"]
    ]);
    let p = XyzPlot::from_args(args.as_array().unwrap(), Mode::Txt2Img).unwrap();
    let cells = p.cells(&base(), &mut no_seed).unwrap();
    let order: Vec<_> = cells
        .iter()
        .map(|c| c.cell.checkpoint.clone().unwrap())
        .collect();
    assert_eq!(order, ["a.safetensors", "a.safetensors", "b", "b"]);
    assert_eq!(p.axes[1].text, "a.safetensors,b");
}

#[test]
fn prompt_sr_replaces_the_first_value_in_both_prompts() {
    let args = json!([7, "red, blue, green"]);
    let p = XyzPlot::from_args(args.as_array().unwrap(), Mode::Txt2Img).unwrap();
    let cells = p.cells(&base(), &mut no_seed).unwrap();
    let prompts: Vec<_> = cells
        .iter()
        .map(|c| {
            (
                c.cell.request.prompt.clone(),
                c.cell.request.negative_prompt.clone(),
            )
        })
        .collect();
    assert_eq!(prompts[0], ("a red cat".into(), "blurry red".into()));
    assert_eq!(prompts[1], ("a blue cat".into(), "blurry blue".into()));
    assert_eq!(prompts[2].0, "a green cat");
    let args = json!([7, "purple, blue"]);
    let p = XyzPlot::from_args(args.as_array().unwrap(), Mode::Txt2Img).unwrap();
    assert!(p
        .cells(&base(), &mut no_seed)
        .unwrap_err()
        .0
        .contains("did not find purple"));
}

#[test]
fn seeds_minus_one_are_fixed_once_unless_kept_and_vary_seeds_counts_up() {
    let mut next = 500u64;
    let mut draw = || {
        next += 1;
        next
    };
    let p = XyzPlot::from_args(&[json!("Seed"), json!("-1, 7")], Mode::Txt2Img).unwrap();
    let fixed = p.with_fixed_seeds(&mut draw);
    assert_eq!(
        fixed.axes[0].values,
        vec![AxisValue::Int(501), AxisValue::Int(7)]
    );
    assert_eq!(fixed.grid_fields(&[0])[2].1, "501, 7");
    let mut args = vec![
        json!("Steps"),
        json!("1,2"),
        json!(null),
        json!("CFG Scale"),
        json!("3,4"),
    ];
    args.extend([json!(null), json!(0), json!(""), json!(null), json!(true)]);
    args.extend([
        json!(false),
        json!(false),
        json!(false),
        json!(true),
        json!(true),
    ]);
    let p = XyzPlot::from_args(&args, Mode::Txt2Img).unwrap();
    let seeds: Vec<_> = p
        .cells(&base(), &mut no_seed)
        .unwrap()
        .iter()
        .map(|c| c.cell.request.seed)
        .collect();
    assert_eq!(seeds, [100, 101, 102, 103]);
}

struct Fake;

impl CellRunner for Fake {
    type Error = ScriptError;
    fn run_cell(&mut self, cell: &Cell) -> Result<Option<CellImage>, ScriptError> {
        let r = &cell.request;
        let v = (r.steps * 10) as u8;
        let mut parameters = Infotext::new(&r.prompt, &r.negative_prompt);
        parameters.push("Steps", r.steps).push("Version", "sdkube");
        Ok(Some(CellImage {
            image: RgbImage::from_pixel(r.width as u32, r.height as u32, Rgb([v, v, v])),
            seed: r.seed,
            parameters,
        }))
    }
    fn upscale(
        &mut self,
        _: &str,
        image: &image::DynamicImage,
        _: f32,
    ) -> Result<image::DynamicImage, ScriptError> {
        Ok(image.clone())
    }
}

#[test]
fn output_is_grid_then_cells_with_a1111s_lists() {
    let mut args = vec![
        json!("Steps"),
        json!("1-3"),
        json!(null),
        json!("Size"),
        json!("64x64, 32x32"),
    ];
    args.extend([
        json!(null),
        json!(0),
        json!(""),
        json!(null),
        json!(false),
        json!(true),
    ]);
    let p = XyzPlot::from_args(&args, Mode::Txt2Img).unwrap();
    let out = p.run(&base(), &mut Fake, &mut no_seed).unwrap();
    assert_eq!(out.images.len(), 1 + 6);
    assert_eq!(out.all_prompts.len(), 6);
    assert_eq!(out.index_of_first_image, 1);
    // No legend: the grid is 3 × 2 cells of the largest size.
    assert_eq!(out.images[0].image.dimensions(), (192, 128));
    // Cell (x=1, y=1) is 32x32, centred in its 64x64 slot, 20 grey.
    assert_eq!(out.images[0].image.get_pixel(64 + 32, 64 + 32).0[0], 20);
    assert_eq!(
        *out.images[0].image.get_pixel(64 + 2, 64 + 2),
        Rgb([255, 255, 255])
    );
    assert_eq!(out.images[5].image.dimensions(), (32, 32));
    let grid_info = out.images[0].infotext.to_string();
    assert!(
        grid_info.contains("Script: X/Y/Z plot, X Type: Steps, X Values: 1-3, Y Type: Size"),
        "{grid_info}"
    );
    assert!(grid_info.ends_with("Version: sdkube"), "{grid_info}");
    assert_eq!(out.images[2].infotext.get("Steps"), Some("2"));
    assert!(out.images[2].infotext.get("Script").is_none());
}

#[test]
fn z_axis_makes_a_grid_of_grids_and_sub_grids_on_request() {
    let mut args = vec![
        json!("Steps"),
        json!("1,2"),
        json!(null),
        json!(0),
        json!(""),
    ];
    args.extend([
        json!(null),
        json!("CFG Scale"),
        json!("3,4,5"),
        json!(null),
        json!(true),
    ]);
    args.extend([json!(false), json!(true)]);
    let p = XyzPlot::from_args(&args, Mode::Txt2Img).unwrap();
    let out = p.run(&base(), &mut Fake, &mut no_seed).unwrap();
    assert_eq!(out.images.len(), 1 + 3);
    assert_eq!(out.all_prompts.len(), 3 + 6);
    let sub = out.images[1].image.dimensions();
    // The legend adds room above (no row labels: Y is Nothing).
    assert_eq!(sub.0, 128);
    assert!(sub.1 > 64);
    let main = out.images[0].image.dimensions();
    assert_eq!(main.0, 3 * sub.0);
    assert!(main.1 > sub.1);
    let info = out.images[0].infotext.to_string();
    assert!(
        info.contains("Z Type: CFG Scale, Z Values: \"3,4,5\""),
        "{info}"
    );
    assert!(!out.images[1].infotext.to_string().contains("Z Type"));
}
