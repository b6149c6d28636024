//! Loading the guest: kernel (PVH `vmlinux`, or bzImage through the 64-bit
//! Linux boot protocol), initrd and command line, and the boot information
//! structures that tell the kernel where they are.

mod e820;
mod initrd;
mod kernel;
mod linux64;
mod pvh;

use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use kernel::KernelFormat;

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use crate::vstate::vcpu::BootEntry;

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error(
        "kernel not found at {0} (build the guest image with guest-image/build, or pass --kernel)"
    )]
    KernelMissing(PathBuf),
    /// The initrd file cannot be opened.
    #[error(
        "initrd not found at {0} (build the guest image with guest-image/build, or pass --initrd)"
    )]
    InitrdMissing(PathBuf),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a kernel this VMM boots.
    #[error("{path} is not a bootable x86_64 kernel: {reason}")]
    NotAKernel { path: PathBuf, reason: String },
    /// The initrd does not fit.
    #[error(
        "the initrd ({initrd_mib} MiB) does not fit in guest memory above the kernel; \
         give the guest more memory (--memory)"
    )]
    InitrdTooBig { initrd_mib: u64 },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write the {0} into guest memory (is the guest memory too small?)")]
    Write(&'static str),
}

/// Where the loaded pieces ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedGuest {
    /// How the boot vCPU enters the kernel.
    pub entry: BootEntry,
    /// Which format the kernel was.
    pub format: KernelFormat,
}

/// Fails early, before any VM exists, when the kernel or initrd is missing.
pub fn check_files(kernel: &Path, initrd: Option<&Path>) -> Result<(), BootError> {
    if !kernel.is_file() {
        return Err(BootError::KernelMissing(kernel.to_path_buf()));
    }
    match initrd {
        Some(p) if !p.is_file() => Err(BootError::InitrdMissing(p.to_path_buf())),
        _ => Ok(()),
    }
}

/// Builds a kernel command line from space-separated parts.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for part in parts.iter().flat_map(|p| p.split_whitespace()) {
        cmdline
            .insert_str(part)
            .map_err(|e| BootError::Cmdline(format!("{e} (at '{part}')")))?;
    }
    Ok(cmdline)
}

/// Loads the kernel, the optional initrd and the command line into `mem`,
/// and writes the boot information for the kernel's entry protocol.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<LoadedGuest, BootError> {
    let kernel = kernel::load_kernel(mem, kernel_path)?;
    let initrd = match initrd_path {
        Some(path) => Some(initrd::load_initrd(mem, path, kernel.end)?),
        None => None,
    };
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|_| BootError::Write("kernel command line"))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    let entry = match kernel.format {
        KernelFormat::ElfPvh => pvh::write_start_info(mem, kernel.entry, initrd)?,
        KernelFormat::ElfLinux64 | KernelFormat::BzImage => {
            linux64::write_boot_params(mem, &kernel, initrd, cmdline_len)?
        }
    };
    Ok(LoadedGuest {
        entry,
        format: kernel.format,
    })
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    /// Guest address of its first byte.
    pub addr: GuestAddress,
    /// Its size in bytes.
    pub size: u64,
}
