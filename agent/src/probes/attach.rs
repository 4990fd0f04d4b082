//! Loading and attaching the programs: for each, in order of preference, the link an earlier
//! agent pinned (adopted), or a fresh attachment (pinned when pins are on), or why not (the
//! fallback that serves instead, said in the log and `/ready`). Standby programs are only
//! loaded here; the demand thread attaches them (see [`super::Probes::set_demand`]).

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    programs::{BtfTracePoint, Iter, RawTracePoint, TracePoint},
};
use brokerscope_common::{
    sockets::{CONNECTIONS_MAP, CONNECTIONS_SPILL_MAP, LISTEN_SOCKS_MAP},
    telemetry::Program,
};

use super::{
    error::ProbesError,
    fields,
    lacks::Lacks,
    map_iter,
    maps::map_fd,
    pins::{self, Held},
    status::{Attachment, Degraded, OnStandby},
};
use crate::config::ProbesConfig;

/// What [`attach_all`] did.
pub(super) struct Hooks {
    pub attached: Vec<Attachment>,
    pub degraded: Vec<Degraded>,
    pub standby: Vec<OnStandby>,
    /// The map iterators that read open connections and listeners at scrape time, with the
    /// map each walks.
    pub map_iters: Vec<(Program, &'static str, map_iter::MapIter)>,
    pub held: Vec<(Program, Held)>,
    pub adopted_fds: Vec<(Program, std::os::fd::OwnedFd)>,
}

/// Decided here, per kernel: a program this kernel refuses either stops the agent (the core
/// one) or leaves its capability to a fallback, said in the log, in /ready's `degraded` list
/// and by its absence from `brokerscope_probe_attached`. `lacks` and `refusals` say which
/// programs cannot run on this kernel, and why.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    config: &ProbesConfig,
    pins: Option<&pins::Pins>,
    lacks: &Lacks,
    refusals: &[(Program, fields::PatchError)],
) -> Hooks {
    let mut hooks = Hooks {
        attached: Vec::new(),
        degraded: Vec::new(),
        standby: Vec::new(),
        map_iters: Vec::new(),
        held: Vec::new(),
        adopted_fds: Vec::new(),
    };
    let mut skipped_node_wide = Vec::new();
    for program in attach_order() {
        if hooks.an_alternative_serves(program) {
            continue;
        }
        let disabled = config.disabled_programs.iter().any(|d| d == program.name());
        let skipped = program.node_wide() && !config.node_wide_hooks;
        if let Some(pins) = pins {
            if disabled || skipped {
                // An earlier agent's hook that this configuration leaves out.
                pins.unpin_link(program);
            } else if program.standby().is_none() && hooks.adopt(pins, program) {
                continue;
            }
        }
        if skipped {
            skipped_node_wide.push(program.name());
            continue;
        }
        let refused = refusals.iter().find(|(p, _)| *p == program);
        let result = if disabled {
            Err(ProbesError::Disabled)
        } else if let Some(reason) = lacks.why(program) {
            Err(ProbesError::Lacks(reason.to_string()))
        } else if let Some((_, e)) = refused {
            Err(ProbesError::Fields(e.clone()))
        } else if program.standby().is_some() {
            hooks.load_on_standby(ebpf, pins, program)
        } else {
            attach(ebpf, btf, program, &mut hooks.map_iters).map(|(a, link)| {
                hooks.attached.push(a);
                if let Some(link) = link {
                    hooks.held.push((program, pin_held(pins, program, link)));
                }
            })
        };
        if let Err(e) = result {
            hooks.not_attached(program, &e);
        }
    }
    log_skipped_node_wide(&skipped_node_wide);
    hooks
}

/// Alternatives in order of preference, then every other program. Once one of a set of
/// alternatives serves, the rest are not attached.
fn attach_order() -> impl Iterator<Item = Program> {
    let first: Vec<Program> = Program::ALTERNATIVES
        .into_iter()
        .flatten()
        .copied()
        .collect();
    first
        .clone()
        .into_iter()
        .chain(Program::ALL.into_iter().filter(move |p| !first.contains(p)))
}

/// Says which node-wide hooks the configuration leaves out, if any.
fn log_skipped_node_wide(skipped_node_wide: &[&'static str]) {
    if !skipped_node_wide.is_empty() {
        tracing::info!(
            programs = ?skipped_node_wide,
            "node-wide hooks off (probes.node_wide_hooks = false): each is a syscall \
             tracepoint, which slows every syscall of every process on the node by ~20% \
             while attached"
        );
    }
}

impl Hooks {
    /// Records that `program` is not attached, and why, with the fallback that serves instead.
    fn not_attached(&mut self, program: Program, e: &ProbesError) {
        let fallback = program.fallback();
        let (error, verifier_log) = one_line(e);
        tracing::warn!(program = program.name(), %error, fallback, "program not attached");
        self.degraded.push(Degraded {
            program,
            error,
            verifier_log,
        });
    }

    /// Whether another program of `program`'s set of alternatives is attached already.
    fn an_alternative_serves(&self, program: Program) -> bool {
        Program::ALTERNATIVES.iter().any(|set| {
            set.contains(&program)
                && set
                    .iter()
                    .any(|p| self.attached.iter().any(|a| a.program == p.name()))
        })
    }

    /// Takes over the link an earlier agent pinned for `program`, if there is one that opens;
    /// whether it did (a pin that does not open is removed, and the program attached anew).
    fn adopt(&mut self, pins: &pins::Pins, program: Program) -> bool {
        match pins.adopt_link(program) {
            Some(Ok(a)) => {
                self.attached.push(adopted_attachment(program, &a));
                self.held.push((program, a.link));
                self.adopted_fds.extend(a.program.map(|fd| (program, fd)));
                true
            }
            Some(Err(e)) => {
                tracing::warn!(program = program.name(), error = %e, "cannot adopt the pinned link: attaching anew");
                pins.unpin_link(program);
                false
            }
            None => false,
        }
    }

    /// Loads `program` to attach on demand, with the link an earlier agent attached it with
    /// on demand, if pinned (the demand thread detaches it if no longer wanted).
    fn load_on_standby(
        &mut self,
        ebpf: &mut Ebpf,
        pins: Option<&pins::Pins>,
        program: Program,
    ) -> Result<(), ProbesError> {
        let id = load_standby(ebpf, program)?;
        let link = match pins.and_then(|p| p.adopt_link(program)) {
            Some(Ok(a)) => {
                self.attached.push(adopted_attachment(program, &a));
                Some(a.link)
            }
            Some(Err(e)) => {
                tracing::warn!(program = program.name(), error = %e, "cannot adopt the pinned link");
                None
            }
            None => None,
        };
        self.standby.push(OnStandby { program, id, link });
        Ok(())
    }
}

/// `e` in one line, and the verifier's log apart when the verifier refused the program: the
/// log is many lines (all of them go to the diagnostics bundle); its line that says why, with
/// the statistics after it left out, is in the summary.
fn one_line(e: &ProbesError) -> (String, Option<String>) {
    if let ProbesError::Program {
        program,
        hook,
        source,
    } = e
        && let aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } = source.as_ref()
    {
        let log = verifier_log.to_string();
        let why = verifier_reason(&log);
        let summary = format!(
            "cannot load program {program} for {hook}: the kernel's verifier refused it \
             ({io_error}): {why} (its whole log is in the diagnostics bundle)"
        );
        return (summary, Some(log));
    }
    let text = e.to_string();
    (text.lines().collect::<Vec<_>>().join(" | "), None)
}

/// The line of a verifier log that says why: its last one but the statistics.
fn verifier_reason(log: &str) -> &str {
    log.lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty()
                && !["verification time", "stack depth", "processed "]
                    .iter()
                    .any(|s| l.starts_with(s))
        })
        .unwrap_or("the verifier logged nothing")
}

/// How an adopted link shows in /ready and `brokerscope_probe_attached`.
fn adopted_attachment(program: Program, adopted: &pins::Adopted) -> Attachment {
    tracing::info!(
        program = program.name(),
        hook = program.hook(),
        id = adopted.program_id,
        "attached by an earlier agent and counting since: adopted"
    );
    Attachment {
        program: program.name(),
        hook: program.hook(),
        id: adopted.program_id,
        scope: program.scope(),
    }
}

/// Pins `link` if pins are on; a link that cannot be pinned still counts, until the agent
/// stops.
pub(super) fn pin_held(pins: Option<&pins::Pins>, program: Program, link: Held) -> Held {
    if let Some(pins) = pins
        && let Err(e) = pins.pin_link(program, &link)
    {
        tracing::warn!(program = program.name(), error = %e, "not pinned: this hook's counts start over with the next agent");
    }
    link
}

/// Loads a tracepoint program on standby without attaching it; its id.
fn load_standby(ebpf: &mut Ebpf, program: Program) -> Result<u32, ProbesError> {
    let (name, hook) = (program.name(), program.hook());
    let err = |source| ProbesError::Program {
        program: name,
        hook,
        source: Box::new(source),
    };
    let prog = ebpf.program_mut(name).ok_or(ProbesError::Missing {
        kind: "program",
        name,
    })?;
    let prog: &mut TracePoint = prog.try_into().map_err(err)?;
    prog.load().map_err(err)?;
    let id = prog.info().map_err(err)?.id();
    tracing::info!(program = name, hook, id, "loaded, on standby");
    Ok(id)
}

/// Loads and attaches `program`; its link, for the caller to hold (an iterator has none: it is
/// instantiated per read).
fn attach(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    program: Program,
    map_iters: &mut Vec<(Program, &'static str, map_iter::MapIter)>,
) -> Result<(Attachment, Option<Held>), ProbesError> {
    let (name, hook) = (program.name(), program.hook());
    let err = |source| ProbesError::Program {
        program: name,
        hook,
        source: Box::new(source),
    };
    // A map iterator's targets, opened before the program is borrowed.
    let map_fds = iterated_maps(ebpf, program)?;
    let prog = ebpf.program_mut(name).ok_or(ProbesError::Missing {
        kind: "program",
        name,
    })?;
    let (id, link) = match (
        program.raw_tracepoint(),
        program.btf_tracepoint(),
        program.tracepoint(),
    ) {
        (Some(tracepoint), _, _) => {
            let prog: &mut RawTracePoint = prog.try_into().map_err(err)?;
            prog.load().map_err(err)?;
            let link = prog.attach(tracepoint).map_err(err)?;
            let link = prog.take_link(link).map_err(err)?;
            (
                prog.info().map_err(err)?.id(),
                Some(Held::link(link.into())?),
            )
        }
        (None, Some(tracepoint), _) => {
            let prog: &mut BtfTracePoint = prog.try_into().map_err(err)?;
            prog.load(tracepoint, btf).map_err(err)?;
            let link = prog.attach().map_err(err)?;
            let link = prog.take_link(link).map_err(err)?;
            (
                prog.info().map_err(err)?.id(),
                Some(Held::link(link.into())?),
            )
        }
        (None, None, Some((category, tracepoint))) => {
            let prog: &mut TracePoint = prog.try_into().map_err(err)?;
            prog.load().map_err(err)?;
            let link = prog.attach(category, tracepoint).map_err(err)?;
            let link = prog.take_link(link).map_err(err)?;
            (
                prog.info().map_err(err)?.id(),
                Some(Held::tracepoint(link)?),
            )
        }
        (None, None, None) => {
            let prog: &mut Iter = prog.try_into().map_err(err)?;
            (load_iter(prog, btf, program, map_fds, map_iters)?, None)
        }
    };
    tracing::info!(program = name, hook, id, "attached");
    let attachment = Attachment {
        program: name,
        hook,
        id,
        scope: program.scope(),
    };
    Ok((attachment, link))
}

/// The maps `program` iterates over (a map iterator's), each with an fd of its own.
fn iterated_maps(
    ebpf: &Ebpf,
    program: Program,
) -> Result<Vec<(&'static str, std::os::fd::OwnedFd)>, ProbesError> {
    let iterated: &[&'static str] = match program {
        Program::ConnLive => &[CONNECTIONS_MAP],
        Program::ConnSpillLive => &[CONNECTIONS_SPILL_MAP],
        Program::ListenLive => &[LISTEN_SOCKS_MAP],
        _ => &[],
    };
    iterated
        .iter()
        .map(|&map| Ok((map, map_fd(ebpf, map)?)))
        .collect::<Result<Vec<_>, ProbesError>>()
}

/// Loads iterator `program`, linked to each of `map_fds` (a map iterator's) into `map_iters`;
/// its id.
fn load_iter(
    prog: &mut Iter,
    btf: &aya::Btf,
    program: Program,
    map_fds: Vec<(&'static str, std::os::fd::OwnedFd)>,
    map_iters: &mut Vec<(Program, &'static str, map_iter::MapIter)>,
) -> Result<u32, ProbesError> {
    let (name, hook) = (program.name(), program.hook());
    let err = |source| ProbesError::Program {
        program: name,
        hook,
        source: Box::new(source),
    };
    if map_fds.is_empty() {
        // The socket iterator is instantiated inside each namespace it sweeps.
        prog.load("tcp", btf).map_err(err)?;
    } else {
        // Linked to its maps now, instantiated per scrape.
        prog.load("bpf_map_elem", btf).map_err(err)?;
        let fd = prog.fd().map_err(err)?;
        for (map, map_fd) in map_fds {
            let iter = map_iter::MapIter::attach(fd.as_fd(), map_fd.as_fd()).map_err(|source| {
                ProbesError::Link {
                    program: name,
                    source,
                }
            })?;
            map_iters.push((program, map, iter));
        }
    }
    Ok(prog.info().map_err(err)?.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_log_is_summed_up_by_its_reason() {
        // The tail of Debian 6.12's refusal of process_exit_btf (a tp_btf argument it lacks).
        let log = "90: (63) *(u32 *)(r0 +0) = r1\n91: (79) r1 = *(u64 *)(r6 +8)\n\
                   func 'sched_process_exit' doesn't have 2-th argument\n\
                   invalid bpf_context access off=8 size=8\nverification time 4884 usec\n\
                   stack depth 8\nprocessed 87 insns (limit 1000000) max_states_per_insn 0\n";
        assert_eq!(
            verifier_reason(log),
            "invalid bpf_context access off=8 size=8"
        );
        assert_eq!(verifier_reason(""), "the verifier logged nothing");
    }
}
