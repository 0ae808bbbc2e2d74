//! Host-side unit tests of the case declarations.

use super::{BASIC, EXIT_KILL, FORK, HOLDER_UNBOUND, M7, MMAP, SCM, WORKER_ENDED};
use crate::ktap::declared_name_matches;

/// The names a lifetime case builds at run time are the ones its declaration allows.
#[test]
fn test_declared_patterns_allow_the_built_names() {
    for name in [
        "the worker was killed by SIGKILL with work in flight",
        "the worker exited with work in flight",
    ] {
        assert!(declared_name_matches(WORKER_ENDED, name), "{name}");
    }
    assert!(!declared_name_matches(WORKER_ENDED, "the worker hung"));
    for who in ["child", "receiver"] {
        let name = format!(
            "after the opener's exit the {who} holds an unbound file: INFO not bound, SUBMIT EPERM"
        );
        assert!(declared_name_matches(HOLDER_UNBOUND, &name), "{name}");
    }
    // One plan per case, as many entries as each case reports.
    let plans: Vec<usize> = [BASIC, EXIT_KILL, MMAP, FORK, SCM, M7]
        .iter()
        .map(|s| s.len())
        .collect();
    assert_eq!(plans, [7, 3, 4, 5, 4, 5]);
}
