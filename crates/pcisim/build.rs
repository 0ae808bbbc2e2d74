//! Stamps the binary with the commit it was built from, for `pcisim --version`: a bug report
//! or a CI log then says which pcisim judged the kernel (`pcisim 0.1.0 (commit 0d2658efc28c)`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let abs = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            root.join(p)
        }
    };
    // Rebuild when the checked-out commit moves: HEAD (per worktree), the branch it points to
    // and packed-refs (both in the common git directory).
    let watch = |f: PathBuf| {
        if f.exists() {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    };
    if let (Some(git_dir), Some(common)) = (
        git(&["rev-parse", "--git-dir"]).map(abs),
        git(&["rev-parse", "--git-common-dir"]).map(abs),
    ) {
        watch(git_dir.join("HEAD"));
        watch(common.join("packed-refs"));
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(common.join(branch));
        }
    }
    let stamp = match git(&["rev-parse", "--short=12", "HEAD"]) {
        // The commit checked out when this was built; local edits on top of it are not
        // tracked here (that would rebuild the binary on every edit anywhere in the tree).
        Some(commit) => format!("commit {commit}"),
        None => "commit unknown: not built from a git checkout".to_string(),
    };
    println!("cargo:rustc-env=PCISIM_BUILD_COMMIT={stamp}");
}
