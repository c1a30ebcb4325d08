//! Embeds the git revision the binary is built from, so `bstack --version`
//! says exactly which code is running. Outside a git checkout (a source
//! tarball) the revision is `unknown`.

use std::path::PathBuf;
use std::process::Command;

/// `git ARGS` run in the crate's directory: its trimmed stdout, if it ran.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    let rev = git(&["rev-parse", "--short=12", "HEAD"]);
    println!(
        "cargo:rustc-env=BSTACK_GIT_REV={}",
        rev.as_deref().unwrap_or("unknown")
    );
    // Rebuild when HEAD moves: HEAD itself (a branch switch), the branch's
    // ref (a commit) and packed refs (a gc). Only paths that exist are
    // named, since cargo reruns every build for a missing one.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        let mut watched = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(dir.join(head_ref));
        }
        for path in watched.into_iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
