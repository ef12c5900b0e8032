use std::ffi::OsStr;

use super::*;

#[test]
fn sizes_parse_like_qemu() {
    assert_eq!(parse_size("4G"), Ok(4 << 30));
    assert_eq!(parse_size("512m"), Ok(512 << 20));
    assert_eq!(parse_size("8GiB"), Ok(8 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("4X").is_err());
    assert!(parse_size("G").is_err());
    assert!(parse_size("99999999999T").is_err());
}

#[test]
fn vm_names_must_be_instance_names() {
    assert!(valid_vm_name("vm1"));
    assert!(valid_vm_name("web-01.prod"));
    assert!(!valid_vm_name(""));
    assert!(!valid_vm_name("a b"));
    assert!(!valid_vm_name("a\\x2d"));
    assert!(!valid_vm_name(".hidden"));
}

#[test]
fn notify_rejects_relative_sockets() {
    assert!(notify_to(OsStr::new("relative/path"), "READY=1").is_err());
}

#[test]
fn report_counts_and_prints_one_line_per_check() {
    let mut r = Report::default();
    r.push(Status::Ok, "a");
    r.push(Status::Fail, "b: do x");
    assert!(!r.passed());
    let text = r.to_string();
    assert!(text.starts_with("OK   a\nFAIL b: do x\n"), "{text}");
    assert!(text.ends_with("1 failed, 0 warnings, 1 passed"));
}
