//! A1111's value syntax for X/Y/Z plot axes (`scripts/xyz_grid.py`): a CSV line (quotes keep
//! commas inside a value), each value trimmed; for number axes, ranges `1-5` (every integer,
//! both ends in), `1-5 (+2)` (a step) and `1-10 [5]` (a count, evenly spaced, ends in).

use std::sync::LazyLock;

use regex::Regex;

use super::ScriptError;

/// `start-end` with an optional `(+step)`, integers (A1111's `re_range`).
static INT_RANGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*$")
        .expect("valid regex")
});
/// `start-end` with an optional `[count]`, integers (A1111's `re_range_count`).
static INT_COUNT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])?\s*$")
        .expect("valid regex")
});
/// The float forms; A1111's `.` is any character there, kept as it is.
static FLOAT_RANGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*$",
    )
    .expect("valid regex")
});
static FLOAT_COUNT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*\])?\s*$",
    )
    .expect("valid regex")
});

/// Most values one axis may expand to (a range like `1-100000000` must not allocate).
pub const MAX_AXIS_VALUES: usize = 1000;

/// Splits a CSV text as Python's `csv.reader` with `skipinitialspace` does, every line a
/// row, rows flattened, each value trimmed: `a, "b, c"` is `["a", "b, c"]`.
pub fn csv_values(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut chars = line.chars().peekable();
        let mut field = String::new();
        let (mut at_start, mut quoted) = (true, false);
        let mut row = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted => {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        quoted = false;
                    }
                }
                '"' if at_start => {
                    quoted = true;
                    at_start = false;
                }
                ',' if !quoted => {
                    row.push(std::mem::take(&mut field));
                    at_start = true;
                }
                ' ' if at_start => {}
                c => {
                    field.push(c);
                    at_start = false;
                }
            }
        }
        row.push(field);
        // An empty line is no row at all for csv.reader.
        if !(row.len() == 1 && row[0].is_empty() && line.trim().is_empty()) {
            out.extend(row);
        }
    }
    out.into_iter().map(|v| v.trim().to_string()).collect()
}

/// Writes values as one CSV line (Python's `csv.writer`), as A1111 records dropdown values.
pub fn csv_line(values: &[String]) -> String {
    values
        .iter()
        .map(|v| {
            if v.contains([',', '"', '\n', '\r']) || v.starts_with(' ') {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn int_of(what: &str, s: &str) -> Result<i64, ScriptError> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    compact
        .parse()
        .map_err(|_| ScriptError(format!("{what}: {s:?} is not a whole number")))
}

fn float_of(what: &str, s: &str) -> Result<f64, ScriptError> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    match compact.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(ScriptError(format!("{what}: {s:?} is not a number"))),
    }
}

fn too_many(what: &str) -> ScriptError {
    ScriptError(format!(
        "{what}: more than {MAX_AXIS_VALUES} values on one axis"
    ))
}

/// numpy's `linspace(start, stop, num)`: `num` values, both ends in.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        n => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// An integer axis's values: ranges expanded as A1111 does (Python's `range(start, end + 1,
/// step)`; a count truncates numpy's evenly spaced floats toward zero).
pub fn int_values(what: &str, values: &[String]) -> Result<Vec<i64>, ScriptError> {
    let mut out = Vec::new();
    for v in values {
        if let Some(m) = INT_RANGE.captures(v) {
            let start = int_of(what, &m[1])?;
            let end = int_of(what, &m[2])? + 1;
            let step = m.get(3).map_or(Ok(1), |s| int_of(what, s.as_str()))?;
            if step == 0 {
                return Err(ScriptError(format!("{what}: {v:?} has a step of 0")));
            }
            let mut x = start;
            while (step > 0 && x < end) || (step < 0 && x > end) {
                if out.len() >= MAX_AXIS_VALUES {
                    return Err(too_many(what));
                }
                out.push(x);
                x += step;
            }
        } else if let Some(m) = INT_COUNT.captures(v) {
            let start = int_of(what, &m[1])? as f64;
            let stop = int_of(what, &m[2])? as f64;
            let num = m.get(3).map_or(Ok(1), |s| int_of(what, s.as_str()))? as usize;
            if out.len() + num > MAX_AXIS_VALUES {
                return Err(too_many(what));
            }
            out.extend(
                linspace(start, stop, num)
                    .into_iter()
                    .map(|x| x.trunc() as i64),
            );
        } else {
            out.push(int_of(what, v)?);
        }
    }
    Ok(out)
}

/// A float axis's values: `a-b (+s)` is numpy's `arange(a, b + s, s)` (its count rounded
/// up, so a step that does not divide the span evenly can pass `b`, as in A1111), `a-b [n]`
/// numpy's `linspace`.
pub fn float_values(what: &str, values: &[String]) -> Result<Vec<f64>, ScriptError> {
    let mut out = Vec::new();
    for v in values {
        if let Some(m) = FLOAT_RANGE.captures(v) {
            let start = float_of(what, &m[1])?;
            let end = float_of(what, &m[2])?;
            let step = m.get(3).map_or(Ok(1.0), |s| float_of(what, s.as_str()))?;
            if step == 0.0 {
                return Err(ScriptError(format!("{what}: {v:?} has a step of 0")));
            }
            let count = ((end + step - start) / step).ceil().max(0.0);
            if count > (MAX_AXIS_VALUES - out.len()) as f64 {
                return Err(too_many(what));
            }
            out.extend((0..count as usize).map(|i| start + i as f64 * step));
        } else if let Some(m) = FLOAT_COUNT.captures(v) {
            let start = float_of(what, &m[1])?;
            let stop = float_of(what, &m[2])?;
            let num = m.get(3).map_or(Ok(1.0), |s| float_of(what, s.as_str()))? as usize;
            if out.len() + num > MAX_AXIS_VALUES {
                return Err(too_many(what));
            }
            out.extend(linspace(start, stop, num));
        } else {
            out.push(float_of(what, v)?);
        }
    }
    Ok(out)
}

/// A float as Python's `str(round(x, 8))` writes it: `7.0`, `0.35`, `1e-05`.
pub fn python_float(x: f64) -> String {
    let x = (x * 1e8).round() / 1e8;
    if x == 0.0 {
        return "0.0".into();
    }
    let abs = x.abs();
    if !(1e-4..1e16).contains(&abs) {
        // Python's repr switches to exponent form here, two digits at least.
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn csv_quotes_keep_commas_and_values_are_trimmed() {
        assert_eq!(csv_values(r#"a, "b, c" ,d"#), strs(&["a", "b, c", "d"]));
        assert_eq!(csv_values(r#""say ""hi""", x"#), strs(&["say \"hi\"", "x"]));
        assert_eq!(csv_values("1,2\n3"), strs(&["1", "2", "3"]));
        assert_eq!(csv_values(""), Vec::<String>::new());
        assert_eq!(csv_values("a,,b"), strs(&["a", "", "b"]));
        assert_eq!(
            csv_line(&strs(&["Euler a", "DPM++ 2M, fast"])),
            r#"Euler a,"DPM++ 2M, fast""#
        );
    }

    #[test]
    fn int_ranges_follow_python_range_and_linspace() {
        let v = |s: &str| int_values("Steps", &csv_values(s)).unwrap();
        assert_eq!(v("1-5"), vec![1, 2, 3, 4, 5]);
        assert_eq!(v("1-5 (+2)"), vec![1, 3, 5]);
        assert_eq!(v("10-1 (-3)"), vec![10, 7, 4]);
        assert_eq!(v("1-10 [5]"), vec![1, 3, 5, 7, 10]);
        assert_eq!(v("0-10 [3]"), vec![0, 5, 10]);
        assert_eq!(v("-1, 7, 2-3"), vec![-1, 7, 2, 3]);
        assert_eq!(v(" 5 - 7 "), vec![5, 6, 7]);
        assert!(int_values("Steps", &strs(&["1.5"]))
            .unwrap_err()
            .0
            .contains("1.5"));
        assert!(int_values("Steps", &strs(&["1-5 (+0)"])).is_err());
        assert!(int_values("Seed", &strs(&["1-100000000"])).is_err());
    }

    #[test]
    fn float_ranges_follow_numpy_arange_and_linspace() {
        let v = |s: &str| float_values("CFG Scale", &csv_values(s)).unwrap();
        assert_eq!(v("5-7"), vec![5.0, 6.0, 7.0]);
        assert_eq!(v("1-2 (+0.5)"), vec![1.0, 1.5, 2.0]);
        assert_eq!(v("0-1 [5]"), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(v("7.5, 3"), vec![7.5, 3.0]);
        // numpy's arange counts ceil((end + step - start) / step) values: with float
        // rounding that can pass the end, as in A1111 (arange(1, 1.3, 0.1) has 4 values).
        assert_eq!(v("1-2 (+0.1)").len(), 11);
        assert_eq!(v("1-1.2 (+0.1)").len(), 4);
        assert!(float_values("CFG Scale", &strs(&["high"])).is_err());
    }

    #[test]
    fn floats_print_as_python_does() {
        assert_eq!(python_float(7.0), "7.0");
        assert_eq!(python_float(0.35), "0.35");
        assert_eq!(python_float(1.0 + 2.0 * 0.1), "1.2");
        assert_eq!(python_float(0.00001), "1e-05");
        assert_eq!(python_float(-2.5), "-2.5");
    }
}
