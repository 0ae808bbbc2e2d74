//! Who may connect: the peer's credentials (SO_PEERCRED) and the admission check the event loop
//! runs on every accepted client (and `pcisim serve`'s control socket on its own). A leaf,
//! re-exported from [`crate::server`].

use std::io;
use std::os::unix::net::UnixStream;

use crate::sys::{self, PeerCred};

/// The credentials of the process at the other end of `stream` (SO_PEERCRED: recorded by the
/// kernel when the peer connected).
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCred> {
    sys::peer_cred(stream)
}

/// Whether the peer of a freshly accepted `stream` may talk to us: its uid is the server's
/// effective uid or one of `allowed`. A refused peer (or one whose credentials cannot be read)
/// is logged at `warn!` with its pid and uid, prefixed by `what`; the caller closes the stream
/// and keeps serving.
pub fn admit_peer(stream: &UnixStream, allowed: &[u32], what: &str) -> bool {
    let me = sys::euid();
    match sys::peer_cred(stream) {
        Ok(c) if c.uid == me || allowed.contains(&c.uid) => {
            log::debug!("{what}: peer pid {} uid {} admitted", c.pid, c.uid);
            true
        }
        Ok(c) => {
            log::warn!(
                "{what}: refused a client: pid {} uid {} gid {} (server uid {me}; allow with \
                 --allow-uid {})",
                c.pid,
                c.uid,
                c.gid,
                c.uid
            );
            false
        }
        Err(e) => {
            log::warn!("{what}: refused a client whose credentials cannot be read: {e}");
            false
        }
    }
}
