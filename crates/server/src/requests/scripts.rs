//! A1111's `script_name`/`script_args` on txt2img and img2img: the scripts sdkube runs
//! (X/Y/Z plot, prompt matrix, SD upscale) parsed into the job's work, and every cell they
//! make checked like a request of its own, so that a bad argument is a 400 before the job
//! is queued. A script sdkube does not have stays what it was: accepted, and reported in
//! the response's ignored fields (A1111 answers 422).

use sdkube_pipeline::scripts::{self, Cell, Mode, Script, ScriptError, UpscalerChoice};
use sdkube_pipeline::Request;
use serde_json::Value;

use super::generate::CommonParams;
use super::BuildContext;
use crate::error::ApiError;
use crate::work::{GenerateWork, HiresFix};

/// Whether a request names a script sdkube runs (its `script_args` then travel with the
/// job); an unknown script's arguments are dropped at submission.
pub fn is_run(c: &CommonParams) -> bool {
    c.script_name
        .as_deref()
        .is_some_and(|n| !n.is_empty() && scripts::is_known(n))
}

/// Whether an X/Y/Z plot keeps seed -1 (`no_fixed_seeds`): submission then leaves the
/// request's seed random, and each cell draws its own.
pub fn keeps_random_seed(c: &CommonParams) -> bool {
    c.script_name
        .as_deref()
        .is_some_and(|n| n.trim().eq_ignore_ascii_case("X/Y/Z plot"))
        && c.script_args.get(12) == Some(&Value::Bool(true))
}

/// The upscaler SD upscale's arguments name, by index into `/sdapi/v1/upscalers` or by name
/// (without the store here, in the `api` role, the plain resizers; the worker checks the rest).
fn upscaler_name(ctx: &BuildContext<'_>, choice: UpscalerChoice) -> Result<String, ScriptError> {
    let names: Vec<String> = match (&ctx.files, choice) {
        (Some(files), _) => files.post.upscalers().into_iter().map(|u| u.name).collect(),
        (None, UpscalerChoice::Index(i)) if i < 3 => {
            return Ok(["None", "Lanczos", "Nearest"][i].to_string())
        }
        (None, UpscalerChoice::Index(i)) => return Ok(format!("upscaler #{i}")),
        (None, UpscalerChoice::Name(n)) => return Ok(n.to_string()),
    };
    let found = match choice {
        UpscalerChoice::Index(i) => names.get(i),
        UpscalerChoice::Name(n) => names.iter().find(|u| u.eq_ignore_ascii_case(n)),
    };
    found.cloned().ok_or_else(|| {
        ScriptError(format!(
            "script_args[2] (SD upscale upscaler) {choice:?} is not an upscaler of \
             /sdapi/v1/upscalers ({} of them: {})",
            names.len(),
            names.join(", ")
        ))
    })
}

/// The script a request runs, parsed and with each of its cells checked by `check` (limits,
/// sampler, prompt) and their upscalers by this process's list.
pub fn script_of(
    ctx: &BuildContext<'_>,
    c: &CommonParams,
    mode: Mode,
    request: &Request,
    hires: Option<&HiresFix>,
    check: &dyn Fn(&Request) -> Result<(), ApiError>,
) -> Result<Option<Script>, ApiError> {
    let Some(name) = c.script_name.as_deref().filter(|_| is_run(c)) else {
        return Ok(None);
    };
    let bad = |e: ScriptError| ApiError::bad_request(format!("script {name:?}: {e}"));
    let names = |choice: UpscalerChoice| upscaler_name(ctx, choice);
    let Some(mut script) = Script::parse(name, &c.script_args, mode, &names).map_err(bad)? else {
        return Ok(None);
    };
    if let Script::Xyz(x) = &mut script {
        x.random_base_seed = c.seed < 0;
    }
    let base = Cell {
        request: request.clone(),
        hires: hires.cloned(),
        checkpoint: None,
    };
    let cells = script
        .cells(&base, &mut sdkube_pipeline::random_seed)
        .map_err(bad)?;
    for cell in &cells {
        check(&cell.request)
            .map_err(|e| ApiError::bad_request(format!("script {name:?}: {}", e.message)))?;
        if let (Some(h), Some(files)) = (&cell.hires, &ctx.files) {
            files
                .post
                .check_upscaler(&h.upscaler)
                .map_err(|e| ApiError::bad_request(format!("script {name:?}: {e}")))?;
        }
    }
    if let (Script::SdUpscale(s), Some(files)) = (&script, &ctx.files) {
        files
            .post
            .check_upscaler(&s.upscaler)
            .map_err(|e| ApiError::bad_request(format!("script {name:?}: {e}")))?;
    }
    Ok(Some(script))
}

/// The device steps of a script job, for progress: every cell's (SD upscale's estimated
/// from the init image's size), times the batch count for SD upscale.
pub fn total_steps(g: &GenerateWork) -> usize {
    let Some(script) = &g.script else { return 0 };
    let base = Cell {
        request: g.request.clone(),
        hires: g.hires.clone(),
        checkpoint: None,
    };
    let per_run: usize = script
        .cells(&base, &mut || 0)
        .map(|cells| cells.iter().map(Cell::steps).sum())
        .unwrap_or(1);
    match script {
        Script::SdUpscale(_) => per_run * g.n_iter.max(1),
        _ => per_run,
    }
    .max(1)
}
