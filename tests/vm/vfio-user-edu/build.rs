//! Embeds the daemon binary the guest program starts (the initramfs runs every program it
//! carries, so the daemon travels inside this one). `VFIO_USER_EDU_DAEMON` names a static
//! `vhost-user-iommu` build; without it an empty file is embedded and the program looks for
//! the daemon at run time (`VFIO_USER_EDU_DAEMON` in its environment, else
//! /bin/vhost-user-iommu).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=VFIO_USER_EDU_DAEMON");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("daemon.bin");
    match std::env::var_os("VFIO_USER_EDU_DAEMON") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            println!("cargo:rerun-if-changed={}", p.display());
            std::fs::copy(&p, &out)
                .unwrap_or_else(|e| panic!("VFIO_USER_EDU_DAEMON={}: {e}", p.display()));
        }
        _ => std::fs::write(&out, b"").expect("write an empty daemon.bin"),
    }
}
