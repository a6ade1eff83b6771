//! One function per subcommand, grouped by role: files and blocks, jobs on the network, the
//! daemon, and jobs run locally.

pub(crate) mod blocks;
pub(crate) mod daemon;
pub(crate) mod jobs;
pub(crate) mod local;
