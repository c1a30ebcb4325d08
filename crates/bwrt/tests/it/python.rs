//! Runs python/test_bwrt.py (the ctypes binding) with `python3` against the
//! cdylib cargo built next to this test.

use std::path::Path;
use std::process::Command;

#[test]
fn python_binding_negotiates_and_runs_waves() {
    let exe = std::env::current_exe().unwrap();
    let lib = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("libbwrt.so"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libbwrt.so not found near {}", exe.display()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_bwrt.py");
    let Ok(out) = Command::new("python3")
        .arg(&script)
        .env("BWRT_LIB", &lib)
        .output()
    else {
        eprintln!("python3 not found: skipping the ctypes binding test");
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test_bwrt.py: ok"),
        "python3 test_bwrt.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
