//! SIGINT, SIGTERM and SIGHUP for long commands.
//!
//! `tabletrace run` passes a signal sent to it alone (`kill -INT PID`) on to
//! the stage it is running and waits for it, so no stage is left writing
//! into the run directory with nobody waiting for it; a terminal's Ctrl-C
//! already reaches the whole process group and is not passed on twice.
//! `tabletrace train` finishes its current step, writes a checkpoint and
//! stops; a second signal (a second or more later) stops it at once.
//! A signal that the process inherited as ignored (`nohup`, `&` in a
//! script) stays ignored.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Set on the first signal: [`stop_flag`].
static STOP: AtomicBool = AtomicBool::new(false);
/// The child that signals sent to this process are passed on to (0: none).
static CHILD: AtomicI32 = AtomicI32::new(0);
/// Monotonic milliseconds of the first signal, for the "second signal stops at once" rule.
static FIRST_AT_MS: AtomicI64 = AtomicI64::new(-1);
/// Whether a second signal ends the process at once.
static SECOND_EXITS: AtomicBool = AtomicBool::new(false);

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn now_ms() -> i64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime is async-signal-safe and writes only `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1000 + t.tv_nsec / 1_000_000
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, kill, clock_gettime, _exit.
    let child = CHILD.load(Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let sent_by_a_process = !info.is_null() && unsafe { (*info).si_code } == libc::SI_USER;
    if child > 0 && sent_by_a_process {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
    let now = now_ms();
    if RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        FIRST_AT_MS.store(now, Ordering::SeqCst);
        STOP.store(true, Ordering::SeqCst);
    } else if SECOND_EXITS.load(Ordering::SeqCst) && now - FIRST_AT_MS.load(Ordering::SeqCst) >= 1000 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (those not inherited
/// as ignored). With `second_exits`, a second signal at least a second after
/// the first ends the process at once.
pub fn install(second_exits: bool) {
    SECOND_EXITS.store(second_exits, Ordering::SeqCst);
    for sig in SIGNALS {
        // SAFETY: plain sigaction calls with zero-initialised structs; the
        // handler only touches atomics and async-signal-safe functions.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// The signal received first, if any.
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// True once a signal arrived.
pub fn stop_flag() -> &'static AtomicBool {
    &STOP
}

/// Runs `cmd`, passing signals sent to this process on to it, and waits.
pub fn run_child(cmd: &mut std::process::Command) -> std::io::Result<std::process::ExitStatus> {
    let mut child = cmd.spawn()?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    status
}

/// The signal's name, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
