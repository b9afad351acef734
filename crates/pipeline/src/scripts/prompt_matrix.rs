//! A1111's "Prompt matrix": the prompt split at `|` into a fixed part and n−1 optional
//! parts; one image per subset of the optional parts (2^(n−1)), in a grid labelled with the
//! parts each column and row has (active) or lacks (struck through).

use super::grid::{draw_annotations, image_grid, Annotation};
use super::{
    blank_like, Args, Cell, CellRunner, ScriptError, ScriptImage, ScriptOutput, MAX_CELLS,
};

/// A prompt matrix's arguments: `[put_at_start, different_seeds, prompt_type,
/// variations_delimiter, margin_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMatrix {
    /// The optional parts go before the fixed one.
    pub put_at_start: bool,
    /// Image i uses seed + i (else all use the seed).
    pub different_seeds: bool,
    /// Split the negative prompt instead of the prompt.
    pub negative: bool,
    /// What joins the parts: ", " (comma), " " (space) or nothing.
    pub delimiter: &'static str,
    /// Pixels between cells.
    pub margin_size: u32,
}

impl PromptMatrix {
    /// Parses A1111's `script_args`; missing ones take its defaults.
    pub fn from_args(args: &[serde_json::Value]) -> Result<Self, ScriptError> {
        let a = Args::new("Prompt matrix", args, 5)?;
        let negative = match a.string(2, "prompt_type", "positive")?.as_str() {
            "positive" => false,
            "negative" => true,
            other => {
                return Err(ScriptError(format!(
                    "script_args[2] (Prompt matrix prompt_type) must be \"positive\" or \
                     \"negative\", got {other:?}"
                )))
            }
        };
        let delimiter = match a.string(3, "variations_delimiter", "comma")?.as_str() {
            "comma" => ", ",
            "space" => " ",
            "none" => "",
            other => {
                return Err(ScriptError(format!(
                    "script_args[3] (Prompt matrix variations_delimiter) must be \"comma\", \
                     \"space\" or \"none\", got {other:?}"
                )))
            }
        };
        Ok(Self {
            put_at_start: a.bool(0, "put_at_start", false)?,
            different_seeds: a.bool(1, "different_seeds", false)?,
            negative,
            delimiter,
            margin_size: a.uint(4, "margin_size", 0, 500)? as u32,
        })
    }

    /// The prompts of the matrix: combination k has optional part i when bit i of k is set.
    pub fn prompts(&self, prompt: &str) -> Result<Vec<String>, ScriptError> {
        let parts: Vec<&str> = prompt.split('|').collect();
        let optional = parts.len() - 1;
        if optional >= 31 || 1usize << optional > MAX_CELLS {
            return Err(ScriptError(format!(
                "the prompt matrix of {} parts makes {} images, over the limit of {MAX_CELLS}",
                parts.len(),
                if optional >= 31 {
                    "billions of".to_string()
                } else {
                    (1u64 << optional).to_string()
                }
            )));
        }
        Ok((0..1usize << optional)
            .map(|k| {
                let mut chosen: Vec<&str> = parts[1..]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| k & (1 << i) != 0)
                    .map(|(_, t)| t.trim().trim_matches(','))
                    .collect();
                if self.put_at_start {
                    chosen.push(parts[0]);
                } else {
                    chosen.insert(0, parts[0]);
                }
                chosen.join(self.delimiter)
            })
            .collect())
    }

    /// One cell per combination, seeds as A1111 gives them.
    pub fn cells(&self, base: &Cell) -> Result<Vec<Cell>, ScriptError> {
        let r = &base.request;
        let source = if self.negative {
            &r.negative_prompt
        } else {
            &r.prompt
        };
        Ok(self
            .prompts(source)?
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut cell = base.clone();
                cell.request.batch_size = 1;
                if self.negative {
                    cell.request.negative_prompt = p;
                } else {
                    cell.request.prompt = p;
                }
                if self.different_seeds {
                    cell.request.seed = r.seed + i as u64;
                }
                cell
            })
            .collect())
    }

    /// Runs the cells and composes the grid (A1111's `draw_prompt_matrix`).
    pub fn run<R: CellRunner>(
        &self,
        base: &Cell,
        runner: &mut R,
    ) -> Result<ScriptOutput, R::Error> {
        let cells = self.cells(base)?;
        let mut out = ScriptOutput {
            index_of_first_image: 1,
            ..ScriptOutput::default()
        };
        let mut images = Vec::with_capacity(cells.len());
        for cell in &cells {
            let img = runner
                .run_cell(cell)?
                .unwrap_or_else(|| blank_like(cell, cell.request.seed));
            out.all_prompts.push(cell.request.prompt.clone());
            out.all_negative_prompts
                .push(cell.request.negative_prompt.clone());
            out.all_seeds.push(img.seed);
            images.push(img);
        }
        let source = if self.negative {
            &base.request.negative_prompt
        } else {
            &base.request.prompt
        };
        let parts: Vec<&str> = source.split('|').collect();
        let pixels: Vec<_> = images.iter().map(|i| i.image.clone()).collect();
        let grid = image_grid(&pixels, 1 << ((parts.len() - 1) / 2));
        let (hor, ver) = matrix_labels(&parts);
        let w = pixels.iter().map(|i| i.width()).max().unwrap_or(1);
        let h = pixels.iter().map(|i| i.height()).max().unwrap_or(1);
        let grid = draw_annotations(&grid, w, h, &hor, &ver, self.margin_size);
        out.images.push(ScriptImage {
            image: grid,
            infotext: images[0].parameters.clone(),
            seed: images[0].seed,
            grid: true,
        });
        out.images.extend(images.into_iter().map(|i| ScriptImage {
            image: i.image,
            infotext: i.parameters,
            seed: i.seed,
            grid: false,
        }));
        Ok(out)
    }
}

/// Column and row labels: the first half of the optional parts across, the rest down; each
/// label lists its half's parts, active where the column (row) has them.
pub fn matrix_labels(parts: &[&str]) -> (Vec<Vec<Annotation>>, Vec<Vec<Annotation>>) {
    let optional = &parts[1..];
    let boundary = optional.len().div_ceil(2);
    let labels = |half: &[&str]| -> Vec<Vec<Annotation>> {
        (0..1usize << half.len())
            .map(|pos| {
                half.iter()
                    .enumerate()
                    .map(|(i, t)| Annotation {
                        text: t.to_string(),
                        active: pos & (1 << i) != 0,
                    })
                    .collect()
            })
            .collect()
    };
    (labels(&optional[..boundary]), labels(&optional[boundary..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_are_every_subset_of_the_parts_in_a1111s_order() {
        let m = PromptMatrix::from_args(&[]).unwrap();
        assert_eq!(
            m.prompts("a cat| red | hat").unwrap(),
            ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
        );
        let m = PromptMatrix::from_args(&[
            json!(true),
            json!(false),
            json!("positive"),
            json!("space"),
        ])
        .unwrap();
        assert_eq!(m.prompts("cat|red").unwrap(), ["cat", "red cat"]);
        assert_eq!(m.prompts("no bars").unwrap(), ["no bars"]);
        assert!(m.prompts(&"x|".repeat(12)).unwrap_err().0.contains("limit"));
    }

    #[test]
    fn bad_args_name_the_problem() {
        let e = PromptMatrix::from_args(&[json!(false), json!(false), json!("both")]).unwrap_err();
        assert!(e.0.contains("prompt_type"), "{e}");
        let e = PromptMatrix::from_args(&[json!("yes")]).unwrap_err();
        assert!(e.0.contains("put_at_start"), "{e}");
        let e =
            PromptMatrix::from_args(&[json!(false), json!(false), json!("positive"), json!("tab")])
                .unwrap_err();
        assert!(e.0.contains("variations_delimiter"), "{e}");
    }

    #[test]
    fn labels_split_the_parts_in_halves() {
        let (hor, ver) = matrix_labels(&["a", "b", "c", "d"]);
        assert_eq!(hor.len(), 4);
        assert_eq!(ver.len(), 2);
        assert_eq!(
            hor[2].iter().map(|a| a.active).collect::<Vec<_>>(),
            [false, true]
        );
        assert_eq!(ver[1][0].text, "d");
    }
}
