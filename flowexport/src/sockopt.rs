//! setsockopt(2) and getsockopt(2) for option values of plain data: the
//! UDP collector's SOL_SOCKET options and the AF_XDP sockets' SOL_XDP ones.

use std::io;
use std::os::fd::RawFd;

/// Sets option `opt` of `level` on socket `fd` to `value`.
pub(crate) fn set<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from `value`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads option `opt` of `level` of socket `fd` into `value`; returns the
/// bytes the kernel wrote. `T` is plain data (integers, or a `#[repr(C)]`
/// struct of them), valid whatever bytes the kernel writes.
pub(crate) fn get<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value` and sets
    // `len` to what it wrote; any bytes are a valid T (see above).
    let r = unsafe { libc::getsockopt(fd, level, opt, std::ptr::from_mut(value).cast(), &mut len) };
    if r == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}
