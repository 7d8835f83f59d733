//! The simulator's randomness hook: this binary's own `getrandom` and `getentropy` symbols,
//! which replace libc's for the whole process and answer from a seeded stream.
//!
//! Why: chitchat draws from `rand::rng()` (seeded through the getrandom crate), tokio seeds its
//! `select!` ordering and std seeds every `HashMap`/`HashSet` (`RandomState`, whose iteration
//! order chitchat depends on) from the OS. None of them takes a seed, but all of them reach the
//! kernel through the libc symbol `getrandom` looked up at run time (`dlsym(RTLD_DEFAULT, ..)`,
//! which finds the executable's definition first). Defining the symbol here makes every one of
//! them read the run's seed (FACTS: identical traces only with this interposition).
//!
//! The stream is per thread: a simulation runs on a thread of its own that calls
//! [`seed_this_thread`] before anything else, so runs on parallel threads (tests, sweeps) never
//! share draws. Threads that were never seeded get real entropy from `/dev/urandom`, so the
//! interposition changes nothing for them.
//!
//! Audit: the only unsafe operations are writing `len` bytes to the caller's `buf`, which both
//! C signatures promise is valid for writes of `len` bytes.

// STYLE: unsafe code is forbidden in the workspace except in this one audited module; C callers
// need `extern "C"` functions with raw pointers, which safe Rust cannot express.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::io::Read;

use crate::rng::mix64;

/// `getentropy` refuses more than this many bytes per call (its POSIX contract).
const GETENTROPY_BYTES_MAX: usize = 256;

thread_local! {
    /// The thread's SplitMix64 state; `None` until the thread is seeded. A `const` initializer
    /// and a `Cell` of plain data: no lazy initialization and no destructor, so reading it is
    /// safe at any point of a thread's life (the hook may be called from anywhere).
    static STREAM: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes every later `getrandom`/`getentropy` call on this thread draw from `seed`. Call it first
/// thing on a fresh thread, before the thread's first `HashMap` or tokio runtime.
pub fn seed_this_thread(seed: u64) {
    STREAM.with(|stream| stream.set(Some(mix64(seed ^ 0x6b6f_6e6f_7273_696d))));
    // Keep the hook referenced from code that runs, so no linker drops it as unused.
    std::hint::black_box(getrandom as unsafe extern "C" fn(*mut u8, usize, u32) -> isize);
    std::hint::black_box(getentropy as unsafe extern "C" fn(*mut u8, usize) -> i32);
}

/// Fills `out` from the thread's seeded stream, or from the kernel on an unseeded thread.
fn fill(out: &mut [u8]) {
    let seeded = STREAM.with(|stream| {
        let Some(mut state) = stream.get() else { return false };
        for chunk in out.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let word = mix64(state).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        stream.set(Some(state));
        true
    });
    if !seeded {
        fill_from_kernel(out);
    }
}

/// Real entropy for threads that run no simulation. Never fails: if `/dev/urandom` cannot be
/// read, the bytes come from a mix of the clock and a stack address (callers such as std's
/// `RandomState` only need them to differ between runs).
fn fill_from_kernel(out: &mut [u8]) {
    let read = std::fs::File::open("/dev/urandom").and_then(|mut file| file.read_exact(out));
    if read.is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mut state = (nanos as u64) ^ (out.as_ptr() as u64);
        for byte in out.iter_mut() {
            state = mix64(state.wrapping_add(1));
            *byte = state as u8;
        }
    }
}

/// libc's `getrandom(2)` wrapper, answered from the thread's stream. `flags` (`GRND_NONBLOCK`,
/// `GRND_RANDOM`, `GRND_INSECURE`) change nothing here: the stream never blocks.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes (the C contract of `getrandom`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getrandom(buf: *mut u8, len: usize, flags: u32) -> isize {
    let _ = flags;
    if len == 0 {
        // getrandom-the-crate probes the symbol with a dangling pointer and length 0.
        return 0;
    }
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes of writes; `len > 0` here.
    let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    fill(out);
    // `len` came from a C `size_t` that getrandom(2) caps at `isize::MAX` (SSIZE_MAX).
    isize::try_from(len).unwrap_or(isize::MAX)
}

/// libc's `getentropy(3)`, answered from the thread's stream: 0 on success, -1 when more than
/// 256 bytes are asked for (POSIX; errno is left as it is).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes (the C contract of `getentropy`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getentropy(buf: *mut u8, len: usize) -> i32 {
    if len > GETENTROPY_BYTES_MAX {
        return -1;
    }
    if len == 0 {
        return 0;
    }
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes of writes; `len > 0` here.
    let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    fill(out);
    0
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// What a fresh thread seeded with `seed` sees: std's hash order and rand's numbers.
    fn observe(seed: u64) -> (Vec<u32>, [u8; 16]) {
        std::thread::spawn(move || {
            seed_this_thread(seed);
            let set: HashSet<u32> = (0..64).collect();
            let mut bytes = [0u8; 16];
            // SAFETY: `bytes` is a live buffer of exactly 16 bytes.
            assert_eq!(unsafe { getentropy(bytes.as_mut_ptr(), bytes.len()) }, 0);
            (set.into_iter().collect(), bytes)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_seeded_thread_sees_the_same_hash_order_and_bytes_every_time() {
        assert_eq!(observe(42), observe(42));
        assert_ne!(observe(42).1, observe(43).1);
    }

    #[test]
    fn getentropy_refuses_more_than_256_bytes() {
        let mut bytes = [0u8; 300];
        // SAFETY: `bytes` is a live buffer of 300 bytes.
        assert_eq!(unsafe { getentropy(bytes.as_mut_ptr(), bytes.len()) }, -1);
    }
}
