//! The only `unsafe` in veer's runtime: pipes and `splice(2)`, the
//! open-file limit, and handing freed heap back to the kernel.
//!
//! Invariants the callers keep (see `relay::splice`):
//! - A pipe is only filled from a socket when it is **empty**, so `EAGAIN`
//!   from socket→pipe always means "the socket has no data", never "the pipe
//!   is full"; and it is drained completely to the other socket before the
//!   next fill, so `EAGAIN` from pipe→socket always means "the socket's send
//!   buffer is full". With that, tokio's readiness (cleared on `WouldBlock`)
//!   is never cleared for the wrong reason.
//! - A pipe goes back to the pool only when empty.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking pipe used as the in-kernel buffer of one relay direction.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity: usize,
}

/// Requested pipe capacity; the kernel may give less (per-user pipe limits).
const PIPE_SIZE: usize = 256 * 1024;
/// Pipes kept per thread for reuse. Kept small: pooled pipes hold two fds
/// each and count, at their enlarged size, against the per-user pipe quota
/// (`fs.pipe-user-pages-soft`) that every sidecar running as the proxy's
/// UID on a node shares.
pub const POOL_MAX: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A new pipe, `O_NONBLOCK | O_CLOEXEC`, enlarged when the kernel allows.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned only here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ on an fd we own; failure
        // (EPERM past the per-user limit) leaves the default size.
        let capacity = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            );
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = if capacity > 0 {
            capacity as usize
        } else {
            65536
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Takes an empty pipe from this thread's pool, or makes one.
    pub fn take() -> io::Result<Pipe> {
        match POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns an **empty** pipe to this thread's pool.
    pub fn give_back(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// `splice(2)` of up to `len` bytes from `from` to `to`, non-blocking.
/// Returns the bytes moved; 0 means end of file on `from`.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (the caller
    // holds the owning objects); null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (capped by
/// `fs.nr_open`, as the kernel refuses more), so that a sidecar is limited
/// by what its operator allows rather than by the usual soft default of
/// 1024. Returns the soft limit before and after.
pub fn raise_fd_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let mut want = lim.rlim_max;
    if want == libc::RLIM_INFINITY {
        want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if want <= lim.rlim_cur {
        return Ok((before, before));
    }
    lim.rlim_cur = want;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, want))
}

/// Number of open file descriptors of this process (for metrics and tests).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Hands the heap memory that is free inside the allocator back to the
/// kernel (glibc `malloc_trim(0)`): the pages of freed chunks in every
/// arena, not only the top of the main heap. Building a snapshot and
/// parsing a control plane's answers leave megabytes freed but kept by
/// glibc, scattered over its per-thread arenas, which `VmRSS` counts until
/// they are reused. Returns whether any memory was released; a no-op
/// (`false`) with other C libraries.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer; it locks each arena and
        // only madvises pages that hold no allocated chunk.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Free memory glibc keeps at the top of each heap before it gives pages
/// back to the kernel: [`keep_free_heap_top`].
pub const HEAP_TOP_KEPT: usize = 512 * 1024;

/// Raises glibc's trim threshold (`M_TRIM_THRESHOLD`, 128 KiB by default)
/// to [`HEAP_TOP_KEPT`]. The relay and the TLS legs take their 64 KiB
/// buffers when bytes arrive and free them when the connection goes quiet
/// (so that idle connections hold none); on a keep-alive connection that
/// is every request, and freeing a chunk of 64 KiB or more makes glibc try
/// to trim its heap: with the default threshold, about every other request
/// ended in an `madvise(MADV_DONTNEED)` of the heap top and a page fault
/// when the next buffer touched it again (tests/l4.rs,
/// `keepalive_syscalls_per_request`). Memory freed elsewhere in the heap
/// is still returned by [`release_free_heap`] after snapshot swaps.
/// Returns whether glibc took the setting; a no-op (`false`) with other C
/// libraries.
pub fn keep_free_heap_top() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and only changes a tunable.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_TOP_KEPT as libc::c_int) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests;
