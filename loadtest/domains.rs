//! Weighted recipient domains (`--domain example.net:70 --domain
//! example.org:30`): each recipient's domain is picked by weight with a
//! stateless hash of the recipient's number (splitmix64), so a run's
//! recipients are the same whatever the shard scheduling.

/// Most `--domain` options.
pub const MAX_DOMAINS: usize = 1000;
/// Largest weight of one domain.
pub const MAX_WEIGHT: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domains {
    names: Vec<String>,
    /// cum[i] = weight of names[0..=i].
    cum: Vec<u64>,
}

/// splitmix64: a cheap, well-mixed 64-bit hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Domains {
    pub fn single(name: &str) -> Domains {
        Domains {
            names: vec![name.to_string()],
            cum: vec![1],
        }
    }

    /// Parses `DOMAIN[:WEIGHT]` specs (weight 1 to 1,000,000, default 1);
    /// `check` validates each domain name.
    pub fn parse(
        specs: &[String],
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Domains, String> {
        if specs.len() > MAX_DOMAINS {
            return Err(format!("at most {MAX_DOMAINS} --domain options"));
        }
        let mut names = Vec::with_capacity(specs.len());
        let mut cum = Vec::with_capacity(specs.len());
        let mut total = 0u64;
        for spec in specs {
            let (name, weight) = match spec.rsplit_once(':') {
                Some((n, w)) => {
                    let w: u64 = w
                        .parse()
                        .map_err(|_| format!("--domain {spec:?}: weight must be a whole number"))?;
                    (n, w)
                }
                None => (spec.as_str(), 1),
            };
            if !(1..=MAX_WEIGHT).contains(&weight) {
                return Err(format!(
                    "--domain {spec:?}: weight must be 1 to {MAX_WEIGHT}"
                ));
            }
            if name.contains('@') {
                return Err(format!("--domain {spec:?}: must not contain '@'"));
            }
            check(name)?;
            total += weight;
            names.push(name.to_string());
            cum.push(total);
        }
        if names.is_empty() {
            return Err("no --domain given".into());
        }
        Ok(Domains { names, cum })
    }

    /// The domain of recipient number `n`.
    pub fn pick(&self, n: u64) -> &str {
        let total = self.cum.last().copied().unwrap_or(1).max(1);
        let r = splitmix64(n) % total;
        let i = self.cum.partition_point(|&c| c <= r);
        self.names
            .get(i)
            .or(self.names.last())
            .map_or("", String::as_str)
    }

    /// `name:weight` for each domain, for the report.
    pub fn describe(&self) -> Vec<String> {
        let mut prev = 0;
        self.names
            .iter()
            .zip(&self.cum)
            .map(|(n, &c)| {
                let w = c - prev;
                prev = c;
                format!("{n}:{w}")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn specs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_weights() {
        let d = Domains::parse(&specs(&["a.net:70", "b.org:30", "c.com"]), ok).expect("parse");
        assert_eq!(d.describe(), vec!["a.net:70", "b.org:30", "c.com:1"]);
        for bad in ["a.net:0", "a.net:x", "a.net:", "a@b:1", "a.net:1000001"] {
            assert!(Domains::parse(&specs(&[bad]), ok).is_err(), "{bad}");
        }
        assert!(Domains::parse(&[], ok).is_err());
        assert!(
            Domains::parse(&specs(&["bad name"]), |n| if n.contains(' ') {
                Err("space".into())
            } else {
                Ok(())
            })
            .is_err()
        );
    }

    #[test]
    fn picks_follow_weights_and_are_deterministic() {
        let d = Domains::parse(&specs(&["a.net:70", "b.org:30"]), ok).expect("parse");
        let n = 100_000u64;
        let a = (0..n).filter(|&i| d.pick(i) == "a.net").count() as f64 / n as f64;
        assert!((0.69..0.71).contains(&a), "share of a.net {a}");
        assert!((0..n).all(|i| d.pick(i) == "a.net" || d.pick(i) == "b.org"));
        let again = Domains::parse(&specs(&["a.net:70", "b.org:30"]), ok).expect("parse");
        assert!((0..1000).all(|i| d.pick(i) == again.pick(i)));
        let one = Domains::single("x.example");
        assert!((0..100).all(|i| one.pick(i) == "x.example"));
        // Weight 1 of 1,000,001 still gets picked sometimes, never out of range.
        let skew = Domains::parse(&specs(&["big:1000000", "tiny:1"]), ok).expect("parse");
        assert!((0..10_000).all(|i| !skew.pick(i).is_empty()));
    }
}
