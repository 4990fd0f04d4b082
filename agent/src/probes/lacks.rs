//! What this kernel lacks, charged to the programs that need it.
//!
//! Offsets are resolved for every program at once, but a kernel that lacks one tracepoint, one
//! record field or one struct member must lose only the programs that read it (and they their
//! capability only where no fallback serves). Each lookup names the programs it is for; a
//! failed one yields [`NO_OFFSET`] and is remembered against them, and the loader refuses
//! exactly those programs with the lookup's own error as the reason.

use std::fmt::Display;

use brokerscope_common::telemetry::Program;

/// An offset this kernel does not offer. The kernel programs treat it as "absent" where the
/// field is optional to them; a program that needs it is not loaded.
pub use brokerscope_common::processes::NO_FIELD as NO_OFFSET;

/// Failed lookups, by program.
#[derive(Clone, Debug, Default)]
pub struct Lacks {
    missing: Vec<(Program, String)>,
}

impl Lacks {
    /// The offset `found`, or [`NO_OFFSET`] with its error charged to each of `programs`.
    pub fn offset<E: Display>(&mut self, programs: &[Program], found: Result<u32, E>) -> u32 {
        match found {
            Ok(offset) => offset,
            Err(e) => {
                self.charge(programs, e.to_string());
                NO_OFFSET
            }
        }
    }

    /// The offset `found`, or [`NO_OFFSET`] without charging anyone: a field the programs
    /// reading it can do without (they check for [`NO_OFFSET`]).
    pub fn optional<E>(found: Result<u32, E>) -> u32 {
        found.unwrap_or(NO_OFFSET)
    }

    /// Records that each of `programs` cannot run here, and why.
    pub fn charge(&mut self, programs: &[Program], reason: String) {
        for &program in programs {
            if self.why(program).is_none() {
                self.missing.push((program, reason.clone()));
            }
        }
    }

    /// Why `program` cannot run on this kernel (the first lookup it failed), if it cannot.
    pub fn why(&self, program: Program) -> Option<&str> {
        self.missing
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, reason)| reason.as_str())
    }

    /// Every program charged, with its reason, in the order charged.
    pub fn iter(&self) -> impl Iterator<Item = (Program, &str)> {
        self.missing.iter().map(|(p, r)| (*p, r.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_lookup_charges_only_its_programs_with_its_own_error() {
        let mut lacks = Lacks::default();
        let ok: Result<u32, String> = Ok(8);
        assert_eq!(lacks.offset(&[Program::SendReset], ok), 8);
        let missing: Result<u32, String> = Err("tcp:tcp_send_reset has no field saddr".into());
        assert_eq!(
            lacks.offset(&[Program::SendReset, Program::ReceiveReset], missing),
            NO_OFFSET
        );
        assert_eq!(
            lacks.why(Program::SendReset),
            Some("tcp:tcp_send_reset has no field saddr")
        );
        assert!(lacks.why(Program::ReceiveReset).is_some());
        assert!(lacks.why(Program::Retransmit).is_none());
        // The first reason stays.
        lacks.charge(&[Program::SendReset], "later".into());
        assert_eq!(
            lacks.why(Program::SendReset),
            Some("tcp:tcp_send_reset has no field saddr")
        );
        assert_eq!(Lacks::optional::<String>(Err("absent".into())), NO_OFFSET);
        assert_eq!(lacks.iter().count(), 2);
    }
}
