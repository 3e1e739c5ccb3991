//! Sizes as people write and read them: `10G` on the command line, `10 GiB` in listings.
//! Binary units throughout, so a quota set as `10G` is listed back as `10 GiB`.

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Parses `1024`, `1.5K`, `64M`, `64MiB`, `10G`, `2T` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult: u64 = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size unit '{other}' (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 500M, 10G)"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("'{s}' is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

/// `n` bytes in the largest unit it reaches: `512 B`, `1.5 KiB`, `10 GiB` (whole numbers
/// without a decimal).
pub fn format_size(n: u64) -> String {
    let mut unit = 0;
    let mut whole = n;
    while whole >= 1024 && unit < UNITS.len() - 1 {
        whole /= 1024;
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if n.is_multiple_of(scale) {
        return format!("{} {}", n / scale, UNITS[unit]);
    }
    format!("{:.1} {}", n as f64 / scale as f64, UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
    }

    #[test]
    fn sizes_format_in_the_largest_unit() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size((10 << 30) + (1 << 29)), "10.5 GiB");
        assert_eq!(format_size(3 << 40), "3 TiB");
        assert_eq!(format_size(5000 << 40), "5000 TiB");
    }

    #[test]
    fn a_parsed_size_formats_back() {
        for s in ["10 GiB", "64 MiB", "1.5 KiB", "2 TiB"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }
}
