//! What the benchmark binaries share: their few flags (`--runs N`,
//! `--seconds S`, `--only PART`), read from the command line.
//!
//! Each benchmark names the flags it takes ([`Usage`]). Anything else on
//! the command line is refused before the benchmark starts anything (a
//! misspelt `--node 1` must not run a three-node benchmark for a minute),
//! and `--help` prints the usage line.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// The flags one benchmark takes.
#[derive(Debug)]
pub struct Usage {
    /// The binary's name, as the usage line shows it.
    pub name: &'static str,
    /// Flags that take a value, with the value's placeholder: `("--runs", "N")`.
    pub values: &'static [(&'static str, &'static str)],
    /// Flags without a value.
    pub switches: &'static [&'static str],
    /// The parts `--only` can pick; empty if the benchmark has no parts.
    pub parts: &'static [&'static str],
}

impl Usage {
    /// `usage: NAME [--runs N] [--only a|b] [--keep]`.
    pub fn line(&self) -> String {
        let mut line = format!("usage: {}", self.name);
        for (flag, placeholder) in self.values {
            line.push_str(&format!(" [{flag} {placeholder}]"));
        }
        if !self.parts.is_empty() {
            line.push_str(&format!(" [--only {}]", self.parts.join("|")));
        }
        for switch in self.switches {
            line.push_str(&format!(" [{switch}]"));
        }
        line
    }
}

/// What a command line asks of a benchmark.
#[derive(Debug)]
pub enum Parsed {
    Run(Flags),
    Help,
}

#[derive(Debug)]
pub struct Flags {
    values: HashMap<&'static str, String>,
    switches: Vec<&'static str>,
}

impl Flags {
    /// The process's own arguments; prints the usage line and exits on
    /// `--help`, and refuses what `usage` does not name.
    pub fn from_command_line(usage: &Usage) -> Result<Flags> {
        match Flags::parse(usage, std::env::args().skip(1))? {
            Parsed::Run(flags) => Ok(flags),
            Parsed::Help => {
                println!("{}", usage.line());
                std::process::exit(0);
            }
        }
    }

    /// `args` without the program's name.
    pub fn parse(usage: &Usage, args: impl IntoIterator<Item = String>) -> Result<Parsed> {
        let mut flags = Flags { values: HashMap::new(), switches: Vec::new() };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(Parsed::Help);
            }
            if arg == "--only" && !usage.parts.is_empty() {
                let part = args.next().with_context(|| format!("--only needs a part\n{}", usage.line()))?;
                if !usage.parts.contains(&part.as_str()) {
                    bail!("--only takes one of {}, got '{part}'\n{}", usage.parts.join(", "), usage.line());
                }
                flags.values.insert("--only", part);
            } else if let Some((flag, placeholder)) = usage.values.iter().find(|(flag, _)| *flag == arg) {
                let value =
                    args.next().with_context(|| format!("{flag} needs a value ({placeholder})\n{}", usage.line()))?;
                flags.values.insert(flag, value);
            } else if let Some(switch) = usage.switches.iter().find(|switch| **switch == arg) {
                flags.switches.push(switch);
            } else {
                bail!("{} takes no argument '{arg}'\n{}", usage.name, usage.line());
            }
        }
        Ok(Parsed::Run(flags))
    }

    /// `FLAG N`, or `default` without the flag.
    pub fn number(&self, flag: &str, default: u64) -> Result<u64> {
        match self.values.get(flag) {
            Some(value) => value.parse().with_context(|| format!("{flag} takes a number, got '{value}'")),
            None => Ok(default),
        }
    }

    /// Whether the switch `flag` (one without a value) was given.
    pub fn has(&self, flag: &str) -> bool {
        self.switches.contains(&flag)
    }

    /// Whether the part `name` runs: every part without `--only`.
    pub fn wants(&self, name: &str) -> bool {
        self.values.get("--only").is_none_or(|only| only == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: Usage =
        Usage { name: "some-bench", values: &[("--runs", "N")], switches: &["--keep"], parts: &["proxy", "failover"] };

    fn parse(args: &[&str]) -> Result<Parsed> {
        Flags::parse(&USAGE, args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn a_benchmark_takes_the_flags_it_names_and_refuses_any_other_with_its_usage() {
        let Ok(Parsed::Run(flags)) = parse(&["--runs", "5", "--only", "proxy", "--keep"]) else {
            panic!("the named flags should parse");
        };
        assert_eq!(flags.number("--runs", 3).ok(), Some(5));
        assert!(flags.has("--keep"));
        assert!(flags.wants("proxy") && !flags.wants("failover"));

        let Ok(Parsed::Run(defaults)) = parse(&[]) else { panic!("no flags should parse") };
        assert_eq!(defaults.number("--runs", 3).ok(), Some(3));
        assert!(!defaults.has("--keep") && defaults.wants("proxy") && defaults.wants("failover"));

        assert!(matches!(parse(&["--runs", "2", "--help"]), Ok(Parsed::Help)));
        for (args, says) in [
            (&["--run", "5"][..], "takes no argument '--run'"),
            (&["--runs"][..], "--runs needs a value (N)"),
            (&["--only", "proxi"][..], "--only takes one of proxy, failover, got 'proxi'"),
            (&["--only"][..], "--only needs a part"),
        ] {
            let error = format!("{:#}", parse(args).err().unwrap_or_else(|| panic!("{args:?} should be refused")));
            assert!(error.contains(says), "{args:?}: {error}");
            assert!(error.contains("usage: some-bench [--runs N] [--only proxy|failover] [--keep]"), "{error}");
        }
        let Ok(Parsed::Run(flags)) = parse(&["--runs", "many"]) else { panic!("a value parses as text first") };
        let error = format!("{:#}", flags.number("--runs", 3).err().unwrap_or_else(|| panic!("'many' is no number")));
        assert!(error.contains("--runs takes a number, got 'many'"), "{error}");
    }
}
