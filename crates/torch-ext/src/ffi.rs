//! The C ABI convention of `csrc/ffi.h`: NULL for success, else a malloc'ed message.

use std::ffi::{c_char, CStr};

use anyhow::{bail, Result};

extern "C" {
    fn lm_string_free(s: *mut c_char);
}

/// The text of a malloc'ed C string from the C side, freeing it.
pub(crate) fn take_string(s: *mut c_char) -> String {
    // SAFETY: a NUL-terminated string malloc'ed by `lm::dup` (ffi.h), used once.
    let text = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { lm_string_free(s) };
    text
}

/// Turn a C error string (NULL = success) into a `Result`, freeing it.
pub(crate) fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    bail!("{}", take_string(err).trim())
}
