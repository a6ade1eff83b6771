//! The MapReduce engine: the job client, the coordinator that plans and schedules a job, the
//! worker that runs its tasks, and the WebAssembly runtime they run in.

pub mod access;
pub mod client;
pub mod coordinator;
pub mod events;
pub mod local;
pub mod merge;
pub mod runtime;
pub(crate) mod server;
pub mod shipped;
pub mod worker;
