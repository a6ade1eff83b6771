//! Job events and summaries as JSON, the one form `p2pmr run --json`, the HTTP API's event
//! streams and the dashboard all read: each event an object whose `event` field names it.

use p2pmr_protocol::engine::{Counters, Event, JobState, JobSummary, Phase};
use serde_json::{json, Value};

/// Job counters as a JSON object.
pub fn counters_json(c: &Counters) -> Value {
    json!({
        "input_records": c.input_records,
        "input_bytes": c.input_bytes,
        "map_output_records": c.map_output_records,
        "map_output_bytes": c.map_output_bytes,
        "combine_input_records": c.combine_input_records,
        "combine_output_records": c.combine_output_records,
        "shuffle_bytes": c.shuffle_bytes,
        "reduce_output_records": c.reduce_output_records,
        "reduce_output_bytes": c.reduce_output_bytes,
        "local_map_bytes": c.local_map_bytes,
        "remote_map_bytes": c.remote_map_bytes,
        "map_attempts": c.map_attempts,
        "reduce_attempts": c.reduce_attempts,
        "skipped_records": c.skipped_records,
    })
}

/// An event as a JSON object with an `event` field naming it.
pub fn event_json(event: &Event) -> Value {
    match event {
        Event::Accepted { job, coordinator } => {
            json!({"event": "accepted", "job": job.to_string(), "coordinator": coordinator})
        }
        Event::Planned {
            maps,
            reduces,
            input_bytes,
            workers,
        } => json!({"event": "planned", "maps": maps, "reduces": reduces,
                   "input_bytes": input_bytes, "workers": workers}),
        Event::Reused {
            maps,
            reduces,
            input_bytes,
            memo,
        } => json!({"event": "reused", "maps": maps, "reduces": reduces,
                   "input_bytes": input_bytes,
                   "from": if *memo { "memo" } else { "takeover" }}),
        Event::Phase(p) => json!({"event": "phase", "phase": match p {
            Phase::Map => "map",
            Phase::Reduce => "reduce",
            Phase::Store => "store",
            Phase::Fetch => "fetch",
        }}),
        Event::TaskStarted {
            kind,
            task,
            attempt,
            peer,
            local_percent,
        } => json!({"event": "task_started", "kind": kind.name(), "task": task,
                   "attempt": attempt, "peer": peer, "local_percent": local_percent}),
        Event::Backup {
            kind,
            task,
            slow,
            peer,
        } => json!({"event": "backup", "kind": kind.name(), "task": task, "slow": slow,
                   "peer": peer}),
        Event::Split { task, at, rest } => {
            json!({"event": "split", "kind": "map", "task": task, "at": at, "rest": rest})
        }
        Event::VerifyMismatch {
            kind,
            task,
            agreed,
            dissent,
        } => json!({"event": "verify_mismatch", "kind": kind.name(), "task": task,
                   "agreed": agreed, "dissent": dissent}),
        Event::TaskFinished {
            kind,
            task,
            peer,
            bytes,
            millis,
        } => json!({"event": "task_finished", "kind": kind.name(), "task": task,
                   "peer": peer, "bytes": bytes, "millis": millis}),
        Event::TaskFailed {
            kind,
            task,
            peer,
            reason,
            retry,
        } => json!({"event": "task_failed", "kind": kind.name(), "task": task,
                   "peer": peer, "reason": reason, "retry": retry}),
        Event::Completed {
            output,
            counters,
            elapsed_ms,
            cached,
        } => json!({"event": "completed", "output": output.to_string(),
                   "counters": counters_json(counters), "elapsed_ms": elapsed_ms,
                   "cached": cached}),
        Event::Failed { reason } => json!({"event": "failed", "reason": reason}),
        Event::Cancelled => json!({"event": "cancelled"}),
        Event::Fetching {
            root,
            blocks,
            bytes,
            from_ipfs,
            retries,
            done,
        } => json!({"event": "fetching", "root": root.to_string(), "blocks": blocks,
                   "bytes": bytes, "from_ipfs": from_ipfs, "retries": retries, "done": done}),
    }
}

/// A job's summary (as `p2pmr jobs` lists it) as a JSON object.
pub fn summary_json(j: &JobSummary) -> Value {
    let (state, output, reason) = match &j.state {
        JobState::Running => ("running", None, None),
        JobState::Succeeded { output } => ("succeeded", Some(output.to_string()), None),
        JobState::Failed(reason) => ("failed", None, Some(reason.clone())),
        JobState::Cancelled => ("cancelled", None, None),
    };
    json!({
        "job": j.job.to_string(),
        "state": state,
        "output": output,
        "reason": reason,
        "maps": [j.maps.0, j.maps.1],
        "reduces": [j.reduces.0, j.reduces.1],
        "elapsed_ms": j.elapsed_ms,
        "counters": counters_json(&j.counters),
    })
}
