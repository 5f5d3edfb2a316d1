//! Kubernetes resource quantities ("500m", "128Mi", "1e3"), checked before they reach a
//! Deployment: the API server's own check would only fail the apply, after the spec was accepted.

/// The value of a quantity in base units, or None when it is not a quantity.
/// Grammar (apimachinery `resource.Quantity`): sign? digits[.digits] then "", a binary suffix
/// (Ki..Ei), a decimal suffix (n, u, m, k, M..E) or an exponent (e|E sign? digits).
pub fn parse(s: &str) -> Option<f64> {
    let split = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(s.len(), |(i, _)| i);
    let (number, suffix) = s.split_at(split);
    let digits = number.trim_start_matches(['+', '-']);
    if digits.is_empty() || digits == "." || digits.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e => {
            let exp = e.strip_prefix(['e', 'E'])?;
            let digits = exp.trim_start_matches(['+', '-']);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || exp.len() - digits.len() > 1 {
                return None;
            }
            10f64.powi(exp.parse().ok()?)
        }
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn accepts_what_kubernetes_accepts() {
        assert_eq!(parse("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(parse("500m"), Some(0.5));
        assert_eq!(parse("1"), Some(1.0));
        assert_eq!(parse("1.5G"), Some(1.5e9));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(parse("2E-1"), Some(0.2));
        assert_eq!(parse(".5"), Some(0.5));
        assert_eq!(parse("+1k"), Some(1000.0));
    }

    #[test]
    fn refuses_what_kubernetes_refuses() {
        for bad in [
            "lots", "", "Mi", "1 Mi", "1mi", "1KB", "1..2", "1.2.3", "1e", "1e+-2", "--1", "1Mi2", ".",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
