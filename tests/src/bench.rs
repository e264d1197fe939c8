//! What the benchmark binaries share: their few flags (`--runs N`,
//! `--seconds S`, `--only PART`), read from the command line.

use anyhow::{Context, Result};

#[derive(Debug)]
pub struct Flags(Vec<String>);

impl Flags {
    pub fn from_command_line() -> Flags {
        Flags(std::env::args().collect())
    }

    fn value(&self, flag: &str) -> Option<&String> {
        self.0.iter().position(|a| a == flag).and_then(|i| self.0.get(i + 1))
    }

    /// `FLAG N`, or `default` without the flag.
    pub fn number(&self, flag: &str, default: u64) -> Result<u64> {
        match self.0.iter().position(|a| a == flag) {
            Some(_) => {
                let value = self.value(flag).with_context(|| format!("{flag} needs a value"))?;
                value.parse().with_context(|| format!("{flag} takes a number, got '{value}'"))
            }
            None => Ok(default),
        }
    }

    /// Whether the switch `flag` (one without a value) was given.
    pub fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }

    /// Whether the part `name` runs: every part without `--only`.
    pub fn wants(&self, name: &str) -> bool {
        self.value("--only").is_none_or(|only| only == name)
    }
}
