//! The GPU path's on/off switches (this crate's and the networks'): environment variables read
//! once per process, for A/B runs of one technique against the path without it
//! (`benches/gpu_run.sh`).

use std::sync::OnceLock;

/// One switch: `var` set to `on` or `off` picks; unset or empty leaves `default`. Any other
/// value is a typo that would silently measure the wrong path, so it is logged as such (once)
/// and the default stands.
pub struct Switch {
    var: &'static str,
    on: &'static str,
    off: &'static str,
    default: bool,
    value: OnceLock<bool>,
}

impl Switch {
    /// The switch read from `var`: `on` or `off`, else `default`.
    pub const fn new(
        var: &'static str,
        on: &'static str,
        off: &'static str,
        default: bool,
    ) -> Self {
        Self {
            var,
            on,
            off,
            default,
            value: OnceLock::new(),
        }
    }

    /// Its state, read from the environment the first time.
    pub fn is_on(&self) -> bool {
        *self.value.get_or_init(|| {
            let set = std::env::var(self.var).ok();
            self.parse(set.as_deref()).unwrap_or_else(|value| {
                tracing::warn!(
                    "{}={value:?} is neither {:?} nor {:?}; it stays {}",
                    self.var,
                    self.on,
                    self.off,
                    if self.default { self.on } else { self.off }
                );
                self.default
            })
        })
    }

    /// The switch's state for the variable's value, or the value back when it means nothing.
    fn parse<'a>(&self, value: Option<&'a str>) -> Result<bool, &'a str> {
        match value.map(str::trim) {
            None | Some("") => Ok(self.default),
            Some(v) if v.eq_ignore_ascii_case(self.on) => Ok(true),
            Some(v) if v.eq_ignore_ascii_case(self.off) => Ok(false),
            Some(v) => Err(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_pick_the_state_and_typos_are_refused() {
        let graphs = Switch::new("SDKUBE_TEST_GRAPHS", "on", "off", true);
        assert_eq!(graphs.parse(None), Ok(true));
        assert_eq!(graphs.parse(Some("")), Ok(true));
        assert_eq!(graphs.parse(Some("off")), Ok(false));
        assert_eq!(graphs.parse(Some(" OFF ")), Ok(false));
        assert_eq!(graphs.parse(Some("on")), Ok(true));
        assert_eq!(graphs.parse(Some("of")), Err("of"));
        assert_eq!(graphs.parse(Some("0")), Err("0"));

        let kernels = Switch::new("SDKUBE_TEST_KERNELS", "sdkube", "candle", true);
        assert_eq!(kernels.parse(Some("candle")), Ok(false));
        assert_eq!(kernels.parse(Some("off")), Err("off"));
        let benchmark = Switch::new("SDKUBE_TEST_CUDNN", "benchmark", "heuristic", false);
        assert_eq!(benchmark.parse(None), Ok(false));
        assert_eq!(benchmark.parse(Some("benchmark")), Ok(true));
    }

    #[test]
    fn the_environment_is_read_once() {
        // This test alone touches this variable.
        let var = "SDKUBE_TEST_SWITCH_READ_ONCE";
        std::env::set_var(var, "off");
        let switch = Switch::new(var, "on", "off", true);
        assert!(!switch.is_on());
        std::env::set_var(var, "on");
        assert!(!switch.is_on(), "a switch keeps its first reading");
        std::env::remove_var(var);
    }
}
