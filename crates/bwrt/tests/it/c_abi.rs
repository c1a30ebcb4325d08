//! Builds tests/c/test_bwrt.c with the system C compiler against the
//! staticlib cargo built next to this test, and runs it (under valgrind's
//! leak check too, when valgrind is installed).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `libbwrt.a`: the test executable lives in
/// `target/<profile>/deps`, where cargo also leaves the library.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join("libbwrt.a").is_file() {
            return dir.to_path_buf();
        }
    }
    panic!("libbwrt.a not found near {}", exe.display());
}

#[test]
fn c_program_negotiates_the_abi_and_runs_a_wave() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let exe = out.path().join("test_bwrt");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let build = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/test_bwrt.c"))
        .arg(lib_dir().join("libbwrt.a"))
        // What `rustc --print native-static-libs` lists for Linux.
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e} (install cc / gcc)"));
    assert!(
        build.status.success(),
        "compiling test_bwrt.c failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "test_bwrt failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains("checks passed"), "{stdout}");

    // Leak and memory-error check, where valgrind is installed.
    let Ok(vg) = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
        ])
        .args(["--error-exitcode=3", "--quiet"])
        .arg(&exe)
        .output()
    else {
        eprintln!("valgrind not found: skipping the leak check of test_bwrt");
        return;
    };
    assert!(
        vg.status.success(),
        "test_bwrt under valgrind ({}):\n{}",
        vg.status,
        String::from_utf8_lossy(&vg.stderr)
    );
}
