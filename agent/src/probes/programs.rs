//! The programs' status at run time: which are attached, on standby or refused, the fsync
//! programs attached once their tracepoint appears, and the standby programs attached on demand.

use aya::programs::TracePoint;
use brokerscope_common::telemetry::{Capability, Program};

use super::{
    Attachment, Degraded, Demand, FsyncCover, Probes, ProbesError, attach::pin_held, pins::Held,
};

impl Probes {
    pub fn attached(&self) -> &[Attachment] {
        &self.attached
    }

    /// The programs on standby, loaded and attached only on demand.
    pub fn standby(&self) -> impl Iterator<Item = Program> + '_ {
        self.standby.iter().map(|s| s.program)
    }

    /// Attaches the filesystem fsync programs refused at start because their tracepoint did not
    /// exist yet (the filesystem's module was not loaded: it loads with the first mount of one),
    /// once it does. Whether any attached. Cheap while nothing waits: a `stat` per waiting
    /// program.
    pub fn attach_appeared_tracepoints(&mut self) -> bool {
        let mut attached_any = false;
        let waiting: Vec<Program> = self
            .degraded
            .iter()
            .map(|d| d.program)
            .filter(|p| p.capability() == Capability::Fsync && !p.node_wide())
            .collect();
        for program in waiting {
            let Some((category, name)) = program.tracepoint() else {
                continue;
            };
            let events = self.tracefs.join("events").join(category).join(name);
            if !events.exists() {
                continue;
            }
            let Some(Ok(prog)) = self
                .ebpf
                .program_mut(program.name())
                .map(<&mut TracePoint>::try_from)
            else {
                continue;
            };
            if prog.fd().is_err() {
                // Not loaded: refused for another reason than a missing tracepoint.
                continue;
            }
            let attached = prog
                .attach(category, name)
                .and_then(|link| prog.take_link(link))
                .and_then(|link| Ok((link, prog.info()?)))
                .map_err(|e| ProbesError::Program {
                    program: program.name(),
                    hook: program.hook(),
                    source: Box::new(e),
                })
                .and_then(|(link, info)| Ok((Held::tracepoint(link)?, info)));
            match attached {
                Ok((link, info)) => {
                    self.held
                        .push((program, pin_held(self.pins.as_ref(), program, link)));
                    tracing::info!(
                        program = program.name(),
                        hook = program.hook(),
                        id = info.id(),
                        "attached: its tracepoint appeared (filesystem module loaded)"
                    );
                    self.attached.push(Attachment {
                        program: program.name(),
                        hook: program.hook(),
                        id: info.id(),
                        scope: program.scope(),
                    });
                    self.degraded.retain(|d| d.program != program);
                    attached_any = true;
                }
                Err(e) => {
                    tracing::debug!(program = program.name(), error = %e, "still cannot attach")
                }
            }
        }
        attached_any
    }

    /// Which filesystems' fsyncs the attached hooks see.
    pub fn fsync_cover(&self) -> FsyncCover {
        let up = |programs: &[Program]| {
            programs
                .iter()
                .all(|p| self.attached.iter().any(|a| a.program == p.name()))
        };
        FsyncCover {
            ext4: up(&[Program::FsyncExt4Enter, Program::FsyncExt4Exit]),
            xfs: up(&[Program::FsyncXfs]),
            btrfs: up(&[Program::FsyncBtrfs]),
        }
    }

    /// Attaches the standby programs `demand` wants and takes the links of the others, which
    /// detach when dropped: each waits for an RCU grace period (about 75 ms here), so the caller
    /// drops them without holding anything a scrape needs. Whether anything changed, and those
    /// links. A failure is logged and leaves that program as it was (tried again next time).
    pub fn set_demand(&mut self, demand: Demand) -> (bool, Vec<Held>) {
        let mut changed = false;
        let mut detached = Vec::new();
        for s in &mut self.standby {
            let Some(kind) = s.program.standby() else {
                continue;
            };
            let want = demand.wants(kind);
            if want == s.link.is_some() {
                continue;
            }
            let (name, hook) = (s.program.name(), s.program.hook());
            let Some((category, tracepoint)) = s.program.tracepoint() else {
                continue;
            };
            let Some(Ok(prog)) = self.ebpf.program_mut(name).map(<&mut TracePoint>::try_from)
            else {
                continue;
            };
            if want {
                let attached = prog
                    .attach(category, tracepoint)
                    .and_then(|link| prog.take_link(link))
                    .map_err(|e| ProbesError::Program {
                        program: name,
                        hook,
                        source: Box::new(e),
                    })
                    .and_then(Held::tracepoint);
                match attached {
                    Ok(link) => {
                        tracing::info!(program = name, hook, reason = ?kind, "attached on demand");
                        s.link = Some(pin_held(self.pins.as_ref(), s.program, link));
                        self.attached.push(Attachment {
                            program: name,
                            hook,
                            id: s.id,
                            scope: s.program.scope(),
                        });
                        changed = true;
                    }
                    Err(e) => {
                        tracing::warn!(program = name, hook, error = %e, "cannot attach on demand")
                    }
                }
            } else if let Some(link) = s.link.take() {
                if let Some(pins) = &self.pins {
                    pins.unpin_link(s.program);
                }
                detached.push(link);
                tracing::info!(program = name, hook, "detached: no longer needed");
                self.attached.retain(|a| a.program != name);
                changed = true;
            }
        }
        (changed, detached)
    }

    /// Programs this kernel refused (or the config disabled), and what covers for them.
    pub fn degraded(&self) -> &[Degraded] {
        &self.degraded
    }

    /// Capabilities none of whose programs serves (attached or on standby): one line each,
    /// naming why each program is not there.
    pub fn missing(&self) -> Vec<String> {
        missing_capabilities(&self.degraded, |p| {
            self.attached.iter().any(|a| a.program == p.name())
                || self.standby.iter().any(|s| s.program == p)
        })
    }
}

/// Capabilities none of whose programs `serves`, each with why its programs were refused.
fn missing_capabilities(degraded: &[Degraded], serves: impl Fn(Program) -> bool) -> Vec<String> {
    let mut missing: Vec<(Capability, Vec<String>)> = Vec::new();
    for d in degraded {
        let capability = d.program.capability();
        let programs = Program::ALL
            .into_iter()
            .filter(|p| p.capability() == capability);
        if programs.clone().any(&serves) {
            continue;
        }
        let why = format!("{}: {}", d.program.name(), d.error);
        match missing.iter_mut().find(|(c, _)| *c == capability) {
            Some((_, reasons)) => reasons.push(why),
            None => missing.push((capability, vec![why])),
        }
    }
    missing
        .into_iter()
        .map(|(c, reasons)| format!("{} ({})", c.describe(), reasons.join("; ")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_is_missing_only_when_none_of_its_programs_serves() {
        let refused = |program| Degraded {
            program,
            error: "EPERM".into(),
            verifier_log: None,
        };
        let degraded = [
            refused(Program::SockStateBtf),
            refused(Program::FsyncExt4Enter),
            refused(Program::FsyncExt4Exit),
        ];
        // The raw tracepoint counts connections; nothing counts fsyncs.
        let missing = missing_capabilities(&degraded, |p| p == Program::SockStateRaw);
        assert_eq!(
            missing,
            vec![
                "fsync/fdatasync counts and latency (fsync_ext4_enter: EPERM; fsync_ext4_exit: \
                 EPERM)"
                    .to_string()
            ]
        );
        assert!(missing_capabilities(&degraded, |_| true).is_empty());
    }
}
