//! The role policy: which routers monitor and optimise paths towards which
//! others. Roles are dotted (`PROXY.SRC`); a pattern matches a role equal to
//! it or below it (`PROXY` matches `PROXY.SRC.EU`), and `*` matches every
//! role. A router follows the rule with the most specific pattern matching
//! its own role.

use pon_proto::control::valid_role;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy rule {0:?}: not a dotted upper-case role (e.g. PROXY.SRC) or \"*\"")]
    BadPattern(String),
    #[error("policy rule {rule:?}: target {target:?} is not a dotted upper-case role or \"*\"")]
    BadTarget { rule: String, target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// (pattern, targets), most specific pattern first.
    rules: Vec<(String, Vec<String>)>,
}

pub(crate) fn valid_pattern(p: &str) -> bool {
    p == "*" || valid_role(p)
}

/// Does `pattern` cover `role`? Specificity is the pattern's length (`*` is 0).
pub(crate) fn covers(pattern: &str, role: &str) -> bool {
    pattern == "*"
        || role == pattern
        || (role.starts_with(pattern) && role.as_bytes().get(pattern.len()) == Some(&b'.'))
}

impl Default for Policy {
    /// The PANACEA roles: a source optimises towards destinations, masters
    /// and slaves towards each other, and a plain proxy towards every proxy.
    fn default() -> Self {
        let r = |k: &str, v: &[&str]| (k.to_string(), v.iter().map(|s| s.to_string()).collect());
        Policy::from_rules([
            r("PROXY", &["PROXY"]),
            r("PROXY.SRC", &["PROXY.DST"]),
            r("PROXY.DST", &[]),
            r("PROXY.MASTER", &["PROXY.SLAVE"]),
            r("PROXY.SLAVE", &["PROXY.MASTER"]),
        ])
        .expect("default policy is valid")
    }
}

impl Policy {
    pub fn from_rules(
        rules: impl IntoIterator<Item = (String, Vec<String>)>,
    ) -> Result<Self, PolicyError> {
        let mut out = Vec::new();
        for (pattern, targets) in rules {
            if !valid_pattern(&pattern) {
                return Err(PolicyError::BadPattern(pattern));
            }
            if let Some(t) = targets.iter().find(|t| !valid_pattern(t)) {
                return Err(PolicyError::BadTarget {
                    rule: pattern,
                    target: t.clone(),
                });
            }
            out.push((pattern, targets));
        }
        out.sort_by_key(|(p, _)| std::cmp::Reverse(if p == "*" { 0 } else { p.len() }));
        Ok(Policy { rules: out })
    }

    /// Must a router with role `from` monitor and optimise towards `to`?
    pub fn optimises(&self, from: &str, to: &str) -> bool {
        self.rules
            .iter()
            .find(|(p, _)| covers(p, from))
            .is_some_and(|(_, targets)| targets.iter().any(|t| covers(t, to)))
    }

    pub fn rules(&self) -> &[(String, Vec<String>)] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panacea_defaults() {
        let p = Policy::default();
        assert!(p.optimises("PROXY.SRC", "PROXY.DST"));
        assert!(!p.optimises("PROXY.SRC", "PROXY.SRC"));
        assert!(!p.optimises("PROXY.DST", "PROXY.SRC"));
        assert!(p.optimises("PROXY.MASTER", "PROXY.SLAVE"));
        assert!(p.optimises("PROXY.SLAVE", "PROXY.MASTER"));
        assert!(!p.optimises("PROXY.MASTER", "PROXY.MASTER"));
        // Plain PROXY: towards everything in the PROXY family.
        for to in ["PROXY", "PROXY.SRC", "PROXY.DST", "PROXY.SLAVE"] {
            assert!(p.optimises("PROXY", to), "{to}");
        }
        assert!(!p.optimises("PROXY", "APP"));
        // Sub-roles follow their parent's rule.
        assert!(p.optimises("PROXY.SRC.EU", "PROXY.DST.US"));
        // A role no rule covers optimises towards nothing.
        assert!(!p.optimises("MONITOR", "PROXY"));
    }

    #[test]
    fn prefix_match_needs_a_dot() {
        assert!(covers("PROXY", "PROXY.SRC"));
        assert!(!covers("PROXY", "PROXYX"));
        assert!(covers("*", "ANY.THING"));
    }

    #[test]
    fn operator_rules_and_errors() {
        let p = Policy::from_rules([
            ("*".into(), vec![]),
            ("PROXY.EDGE".into(), vec!["PROXY.CORE".into()]),
        ])
        .unwrap();
        assert!(p.optimises("PROXY.EDGE", "PROXY.CORE.X"));
        assert!(!p.optimises("PROXY", "PROXY.CORE"));
        assert_eq!(
            Policy::from_rules([("proxy".into(), vec![])]).unwrap_err(),
            PolicyError::BadPattern("proxy".into())
        );
        assert!(matches!(
            Policy::from_rules([("PROXY".into(), vec!["x y".into()])]),
            Err(PolicyError::BadTarget { .. })
        ));
    }
}
