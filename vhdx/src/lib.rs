//! VHDX (MS-VHDX 1.0) for BootTorrent, in plain Rust with no runtime.
//!
//! - [`inspect`]: is a file a whole, uncorrupted VHDX, and how large is the disk it holds? The
//!   server's catalog and `torrent create` refuse what fails here.
//! - [`create_child`]: a differencing child of a golden image, so that a machine boots the
//!   child and writes into it while the golden image stays byte for byte what the swarm seeds.
//! - [`inspect_child`]: does a child belong to this parent, unchanged since the child was made?

mod child;
mod guid;
mod inspect;
mod locator;

pub use child::{ChildInfo, create_child, inspect_child};
pub use guid::Guid;
pub use inspect::{VhdxError, VhdxInfo, inspect};
pub use locator::{LocatorError, ParentLocator};
