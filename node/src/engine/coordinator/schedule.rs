//! The scheduler of one phase (the map tasks, or the reduce tasks) as a sans-I/O state
//! machine: it decides which task runs where and what each answer means, and does no I/O and
//! reads no clock. The coordinator's driver feeds it time and answers and carries out the
//! [`Action`]s it asks for (start a call, abort one, tell a worker to stop, emit an event), as
//! the network fetcher drives `protocol`'s `FileReader`.
//!
//! Its policies:
//! - **Spread**: one task per peer per round, so tasks spread over the peers; a machine runs
//!   no more tasks at once than its slots, whichever of its daemons run them.
//! - **Locality**: a map task goes first to the free peer holding the largest share of it;
//!   a peer that must fetch takes the pending map task of which it holds the most bytes.
//! - **Delay scheduling**: a peer holding none of the pending map tasks' bytes waits
//!   [`LOCALITY_DELAY`] before taking one it must fetch, and longer while other peers keep
//!   starting tasks they hold (until none has for [`LOCALITY_WAIT`], Spark's rule): their
//!   holders will get to them, and reading a split over the network costs more than it
//!   saves whenever holders free up about as fast.
//! - **Backups** (the paper's backup tasks): once nothing is left to assign, an idle peer
//!   takes a second copy of the task that has run longest, if it has run [`BACKUP_FACTOR`]
//!   times the phase's median; the first copy to finish wins and the other is stopped.
//! - **Cuts** (map tasks, without verification): once no task waits and a slot is free, the
//!   running task with the most input estimated left is asked to cut its range in two; the
//!   rest waits for a slot as a new task. The phase's last tasks then end closer together
//!   than whole splits allow, whatever the machines' speeds.
//! - **Retries**: a peer that fails (unreachable, stalled) is given up on and its task runs
//!   elsewhere, [`MAX_ATTEMPTS`] attempts lost so in a phase at most; a task that fails by itself (trap, time or
//!   memory limit) runs again on another peer while there is one, [`TASK_FAILURES`] times at
//!   most; a `busy` answer is not an attempt.
//! - **Liveness**: peers running our tasks are probed; one that does not answer is given up
//!   on, and its attempts are aborted and retried elsewhere.
//! - **Bad records**: a record that fails its map task twice is left out of that task from
//!   then on, within the job's limit (`--skip-bad-records`).
//! - **Verification** (`--verify K`): each task runs on K distinct peers, and is done when
//!   all K have answered and a majority of K (more than K/2) produced the same output (the
//!   same CIDs); until then it runs on one more peer at a time. Peers whose output differs
//!   from the one used are named in an event and given up on for the rest of the job.
//!   Backups are off: the K copies already race.

use super::Stop;
use libp2p::PeerId;
use p2pmr_protocol::engine::{Counters, Event, JobResponse, TaskKind, MIN_SPLIT_PART};
use p2pmr_protocol::Cid;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a daemon with a free slot waits for a task whose blocks it holds before it takes
/// one it must fetch.
pub const LOCALITY_DELAY: Duration = Duration::from_millis(300);
/// How long no peer must have started a task it holds before a peer takes one it must fetch.
pub(crate) const LOCALITY_WAIT: Duration = Duration::from_secs(1);
/// Attempts of a task a phase may lose with their peers (unreachable, stalled) before the job
/// fails.
pub(crate) const MAX_ATTEMPTS: usize = 4;
/// Times a task may fail by itself (trap, time or memory limit), each on another peer when
/// there is one, before the job fails: a flaky peer is not the job's fault, a bad record is.
pub(crate) const TASK_FAILURES: usize = 3;
/// Backup copies of stragglers: see [`backup_after`].
const BACKUP_FACTOR: u32 = 2;
/// The shortest run after which a task may get a backup copy.
const BACKUP_MIN: Duration = Duration::from_secs(1);
/// When a task may get a backup copy while no task of its phase has finished.
const BACKUP_BLIND: Duration = Duration::from_secs(10);
/// How long an attempt runs before it may be asked to cut its task in two: long enough for its
/// worker to have the task on a LAN (the two requests travel apart), and short, as the whole
/// of a task that has just started is left to share.
const CUT_AFTER: Duration = Duration::from_millis(20);
/// How long after a refused cut (too little left then, or the task not reading yet) the task
/// may be asked again.
const CUT_AGAIN: Duration = Duration::from_millis(250);

/// Names one attempt (one call of a task on a peer) for the phase's lifetime.
pub(crate) type AttemptId = u64;

/// What a phase runs and where.
pub(crate) struct Schedule<'a> {
    pub(crate) kind: TaskKind,
    pub(crate) peers: &'a [PeerId],
    pub(crate) slots: &'a [u32],
    /// The machine each peer runs on, and each machine's slots: a machine runs no more tasks
    /// at once than that, whichever of its peers run them (`None`: a machine per peer).
    pub(crate) machines: Option<(&'a [usize], &'a [u32])>,
    /// For map tasks: the peers holding bytes of each task, with how many, by task
    /// (`(peer, bytes)`, ascending by peer; peers holding none are left out).
    pub(crate) local: Option<Vec<Vec<(usize, u64)>>>,
    /// Input bytes of each task of the job.
    pub(crate) bytes: Vec<u64>,
    /// The tasks to run now.
    pub(crate) tasks: Vec<usize>,
    /// Bad records to leave out of map tasks.
    pub(crate) skips: &'a mut Skips,
    /// Peers each task runs on whose outputs must agree (1: no verification).
    pub(crate) verify: usize,
}

/// What the job keeps across its phases: counters, attempts per task of this phase's kind,
/// and the peers it has given up on.
pub(crate) struct Tally<'a> {
    pub(crate) counters: &'a mut Counters,
    pub(crate) attempts: &'a mut Vec<u32>,
    pub(crate) gone: &'a mut HashSet<PeerId>,
}

/// What the driver is to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Tell the job's watchers.
    Emit(Event),
    /// Call a worker to run a task.
    Start(Start),
    /// Drop the call of this attempt (its answer, if any, is no longer wanted).
    Abort(AttemptId),
    /// Ask the worker on `peer` to stop its copy of `task` (another copy won).
    StopOnWorker {
        /// The worker.
        peer: PeerId,
        /// The task.
        task: usize,
    },
    /// Ask the worker on `peer` to cut its running map task `task` in two; the driver answers
    /// with [`PhaseState::cut_answered`], and with [`PhaseState::cut`] if it was cut.
    Cut {
        /// The worker.
        peer: PeerId,
        /// The task.
        task: usize,
    },
}

/// The rest of a map task cut in two: its input bytes and the peers holding them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rest {
    /// Input bytes the task keeps.
    pub(crate) kept: u64,
    /// Input bytes of the rest.
    pub(crate) bytes: u64,
    /// The peers holding bytes of the rest, with how many (as [`Schedule::local`]).
    pub(crate) local: Vec<(usize, u64)>,
}

/// A task to start.
#[derive(Debug, PartialEq)]
pub(crate) struct Start {
    pub(crate) id: AttemptId,
    pub(crate) task: usize,
    pub(crate) peer: PeerId,
    /// The task's attempt number (1 for its first).
    pub(crate) attempt: u32,
    /// Input offsets of records to leave out (map tasks).
    pub(crate) skip: Vec<u64>,
}

/// A running attempt: its task, its peer (index in the schedule), since when.
#[derive(Debug)]
struct Attempt {
    t: usize,
    p: usize,
    since: Instant,
    /// Records the attempt was told to leave out (outputs made with other lists differ).
    skipped: usize,
}

/// The state of one phase (see the module docs).
pub(crate) struct PhaseState<'a> {
    kind: TaskKind,
    peers: &'a [PeerId],
    local: Option<Vec<Vec<(usize, u64)>>>,
    bytes: Vec<u64>,
    skips: &'a mut Skips,
    tally: Tally<'a>,
    me: PeerId,
    liveness: Duration,
    n: usize,
    /// Tasks to assign, the next one last.
    pending: Pending,
    /// For map tasks: the tasks each peer holds bytes of (the inverse of `local`).
    held_by: Vec<Vec<usize>>,
    free: Vec<u32>,
    /// Each peer's machine, and the slots free on each machine.
    machine: Vec<usize>,
    machine_free: Vec<u32>,
    dead: Vec<bool>,
    running: BTreeMap<AttemptId, Attempt>,
    /// The (task, peer) of each running attempt, so that whether a peer runs a task is one
    /// lookup, not a walk over every attempt.
    running_pairs: HashSet<(usize, usize)>,
    next_id: AttemptId,
    /// Tasks given a backup copy, and attempts stopped because the other copy finished first.
    backed: HashSet<usize>,
    beaten: HashSet<AttemptId>,
    /// How long finished attempts took.
    took: Vec<Duration>,
    complete: HashSet<usize>,
    probing: HashSet<usize>,
    idle_since: Vec<Option<Instant>>,
    /// When a peer last started a map task whose bytes it holds.
    last_local: Option<Instant>,
    /// How often, and on which peers, each task failed by itself.
    failed: HashMap<usize, (usize, HashSet<usize>)>,
    /// Attempts of each task lost with their peer in this phase. Outputs lost with their
    /// holder in an earlier round do not count (Hadoop's killed, not failed, attempts): under
    /// churn a task can lose several in a row through no fault of its own, and the job's
    /// rounds are bounded anyway.
    lost: HashMap<usize, u32>,
    /// Peers that run each task, whose outputs must agree.
    verify: usize,
    /// Verification: the outputs each task's copies produced so far, by peer.
    votes: HashMap<usize, Vec<(usize, JobResponse)>>,
    /// Verification: copies of a task run beyond `verify` because its outputs disagreed.
    extra: HashMap<usize, u32>,
    /// Attempts aborted because their peer's output disagreed with the majority's.
    excluded: HashSet<AttemptId>,
    /// Whether running tasks may be cut in two (map tasks, no verification).
    cuts: bool,
    /// Tasks asked to cut: `None` while the answer is awaited, else when it came (a task that
    /// was cut is not asked again; its rest may be).
    asked: HashMap<usize, Option<Instant>>,
    /// Running attempts of each task.
    copies: Vec<u32>,
    /// When a running task that may not be asked to cut yet first may be (see
    /// [`PhaseState::next_wake`]).
    next_ask: Option<Instant>,
    /// Input bytes and time of the tasks finished so far: the phase's rate, to guess what is
    /// left of a running task.
    finished_bytes: u64,
    finished_time: Duration,
    done: Vec<(usize, JobResponse, PeerId)>,
    actions: Vec<Action>,
}

impl<'a> PhaseState<'a> {
    /// A phase of `sched` run by `me`, giving up on a peer that does not answer a probe within
    /// `liveness`. Peers that are not `connected`, or the job has given up on, take no tasks.
    pub(crate) fn new(
        sched: Schedule<'a>,
        tally: Tally<'a>,
        me: PeerId,
        liveness: Duration,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Self {
        let dead = sched
            .peers
            .iter()
            .map(|p| tally.gone.contains(p) || (*p != me && !connected(p)))
            .collect();
        let verify = sched.verify.max(1);
        let cuts = sched.kind == TaskKind::Map && verify == 1;
        let pending = Pending::new(
            sched
                .tasks
                .iter()
                .rev()
                .flat_map(|&t| std::iter::repeat_n(t, verify))
                .collect(),
            sched.bytes.len(),
        );
        let mut held_by = vec![Vec::new(); sched.peers.len()];
        for (t, holders) in sched.local.iter().flatten().enumerate() {
            for &(p, _) in holders {
                held_by[p].push(t);
            }
        }
        Self {
            kind: sched.kind,
            peers: sched.peers,
            local: sched.local,
            bytes: sched.bytes,
            skips: sched.skips,
            me,
            liveness,
            n: sched.tasks.len(),
            pending,
            held_by,
            free: sched.slots.to_vec(),
            machine: match sched.machines {
                Some((of, _)) => of.to_vec(),
                None => (0..sched.peers.len()).collect(),
            },
            machine_free: match sched.machines {
                Some((_, slots)) => slots.to_vec(),
                None => sched.slots.to_vec(),
            },
            dead,
            running: BTreeMap::new(),
            running_pairs: HashSet::new(),
            next_id: 0,
            backed: HashSet::new(),
            beaten: HashSet::new(),
            took: Vec::new(),
            complete: HashSet::new(),
            probing: HashSet::new(),
            idle_since: vec![None; sched.peers.len()],
            last_local: None,
            failed: HashMap::new(),
            lost: HashMap::new(),
            verify,
            votes: HashMap::new(),
            extra: HashMap::new(),
            excluded: HashSet::new(),
            cuts,
            asked: HashMap::new(),
            copies: vec![0; sched.tasks.iter().max().map_or(0, |&t| t + 1)],
            next_ask: None,
            finished_bytes: 0,
            finished_time: Duration::ZERO,
            done: Vec::with_capacity(sched.tasks.len()),
            actions: Vec::new(),
            tally,
        }
    }

    /// Every task of the phase has an answer.
    pub(crate) fn is_done(&self) -> bool {
        self.done.len() >= self.n
    }

    /// The answers, by task.
    pub(crate) fn into_done(mut self) -> Vec<(usize, JobResponse, PeerId)> {
        self.done.sort_by_key(|d| d.0);
        self.done
    }

    /// The actions decided since the last call, in order.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Why the phase cannot go on: tasks wait and no peer is left to run them.
    pub(crate) fn stuck(&self) -> Option<Stop> {
        let kind = self.kind;
        if !self.running.is_empty() || self.pending.is_empty() {
            return None;
        }
        if self.dead.iter().all(|d| *d) {
            return Some(format!("no daemon is left to run {kind:?} tasks").into());
        }
        // Verification needs distinct peers: a task all live peers have answered for already
        // cannot go on.
        let t = self.pending.last().expect("not empty");
        let able =
            (0..self.peers.len()).any(|p| !self.dead[p] && self.has_slot(p) && self.eligible(t, p));
        if able {
            return None;
        }
        let (k, what) = (self.verify, kind.name());
        let answered = self.votes.get(&t).map_or(0, Vec::len);
        Some(
            format!(
                "verification needs a majority of {k} daemons to produce the same output for \
                 {what} task {t}; {answered} answered without one, and no other daemon is left \
                 to run it"
            )
            .into(),
        )
    }

    /// Starts what can start at `now`, after asking for the cuts free slots call for. Map
    /// tasks go first to daemons that hold them, the most local pairing first (so a
    /// machine's free slot goes to whichever of its daemons holds the most of a task); then
    /// one task per free peer per round while any is taken.
    pub(crate) fn assign(&mut self, now: Instant) {
        // Cuts first: half of what a task has left is better on a free slot than all of it
        // again, and a backup copy is not started while its task's cut is awaited.
        self.ask_cuts(now);
        let after = backup_after(&mut self.took);
        let stragglers = self.stragglers(now, after);
        loop {
            let mut assigned = false;
            if self.assign_local(now) {
                assigned = true;
            }
            for p in 0..self.peers.len() {
                if self.has_slot(p) && !self.dead[p] && self.assign_to(p, now, &stragglers) {
                    assigned = true;
                }
            }
            if !assigned {
                break;
            }
        }
        self.next_ask = self.cut_wake(now);
    }

    /// When a running task that may not be asked to cut yet (too young, or refused a moment
    /// ago) first may be, if a slot would be free for its rest: the caller wakes then rather
    /// than at its next event.
    fn cut_wake(&self, now: Instant) -> Option<Instant> {
        if self.cut_room() == 0 {
            return None;
        }
        self.running
            .values()
            .filter_map(|a| self.cut_asking_at(a))
            .filter(|&at| at > now)
            .min()
    }

    /// How many more cuts may be asked for: the slots free beyond the cuts already awaited,
    /// once no task waits (none while cuts are off).
    fn cut_room(&self) -> usize {
        if !self.cuts || !self.pending.is_empty() || self.running.is_empty() {
            return 0;
        }
        let awaited = self.asked.values().filter(|w| w.is_none()).count();
        self.idle_slots().saturating_sub(awaited)
    }

    /// From when attempt `a` may be asked to cut its task: once its worker can have the task,
    /// and a while after a refusal; never while another copy runs, the task is too small to
    /// cut, done, backed up, or its cut's answer is awaited. The cheap tests come first: at a
    /// large job's end this runs over every running task at each task's end.
    fn cut_asking_at(&self, a: &Attempt) -> Option<Instant> {
        if self.copies[a.t] != 1 || self.bytes[a.t] < 2 * MIN_SPLIT_PART {
            return None;
        }
        if self.complete.contains(&a.t) || self.backed.contains(&a.t) {
            return None;
        }
        match self.asked.get(&a.t) {
            None => Some(a.since + CUT_AFTER),
            Some(None) => None,
            Some(Some(refused)) => Some((*refused + CUT_AGAIN).max(a.since + CUT_AFTER)),
        }
    }

    /// Slots that could take a task now: each machine's free slots, as far as its live peers
    /// have free slots of their own.
    fn idle_slots(&self) -> usize {
        let mut free = vec![0u32; self.machine_free.len()];
        for p in (0..self.peers.len()).filter(|&p| !self.dead[p]) {
            free[self.machine[p]] += self.free[p];
        }
        free.iter()
            .zip(&self.machine_free)
            .map(|(&free, &machine)| free.min(machine) as usize)
            .sum()
    }

    /// Near the end of the map phase, while slots are free, no task waits and fewer cuts are
    /// awaited than slots are free: asks the running tasks with the most input estimated
    /// left (by the phase's rate so far) to cut themselves in two, if they are large enough
    /// to be cut at all. Each task is asked once,
    /// and not while another copy of it runs: a copy started before the cut would cover the
    /// rest too.
    fn ask_cuts(&mut self, now: Instant) {
        let asks = self.cut_room();
        if asks == 0 {
            return;
        }
        let rate = (!self.finished_time.is_zero())
            .then(|| self.finished_bytes as f64 / self.finished_time.as_secs_f64());
        let mut left: Vec<(u64, usize, usize)> = self
            .running
            .values()
            .filter(|a| self.cut_asking_at(a).is_some_and(|at| at <= now))
            // The guess only orders the asks: a task slower than the phase's rate so far
            // has more left than it says, and its worker knows what is left.
            .map(|a| {
                let ran = now.duration_since(a.since).as_secs_f64();
                let read = rate.map_or(0, |r| (r * ran) as u64);
                (self.bytes[a.t].saturating_sub(read), a.t, a.p)
            })
            .collect();
        if left.len() > asks {
            left.select_nth_unstable_by(asks - 1, |a, b| b.cmp(a));
            left.truncate(asks);
        }
        left.sort_unstable_by(|a, b| b.cmp(a));
        for (_, t, p) in left {
            self.asked.insert(t, None);
            self.actions.push(Action::Cut {
                peer: self.peers[p],
                task: t,
            });
        }
    }

    /// When the caller should call [`PhaseState::assign`] again even if nothing happens before:
    /// a running task may then be asked to cut.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        self.next_ask
    }

    /// The answer to the cut of task `t` asked for at `now` has come (whatever it says).
    pub(crate) fn cut_answered(&mut self, t: usize, now: Instant) {
        if let Some(awaited @ None) = self.asked.get_mut(&t) {
            *awaited = Some(now);
        }
    }

    /// Whether task `t` has its answer (a copy of it finished and was taken).
    pub(crate) fn is_complete(&self, t: usize) -> bool {
        self.complete.contains(&t)
    }

    /// Map task `t` was cut in two at input offset `at` (known at `now`): it keeps
    /// `rest.kept` bytes, and the rest is a new task of the job, which waits for a slot;
    /// returns its number. Either may be cut again later.
    pub(crate) fn cut(&mut self, t: usize, at: u64, rest: Rest, now: Instant) -> usize {
        self.asked.insert(t, Some(now));
        let r = self.bytes.len();
        self.bytes[t] = rest.kept;
        self.bytes.push(rest.bytes);
        if let Some(local) = &mut self.local {
            for (_, held) in &mut local[t] {
                *held = (*held).min(rest.kept);
            }
            for &(p, _) in &rest.local {
                self.held_by[p].push(r);
            }
            local.push(rest.local);
        }
        if self.tally.attempts.len() <= r {
            self.tally.attempts.resize(r + 1, 0);
        }
        if self.copies.len() <= r {
            self.copies.resize(r + 1, 0);
        }
        self.pending.grow(r + 1);
        self.pending.push(r);
        self.n += 1;
        self.emit(Event::Split {
            task: t as u32,
            at,
            rest: r as u32,
        });
        r
    }

    /// Starts pending map tasks on free peers holding them, one at a time, each time the
    /// pairing where the peer holds the largest share of the task (ties: the peer with the
    /// most free slots, so tasks spread; then the lowest peer, then the earliest pending
    /// place), until no free peer holds a pending task; says whether it started any.
    fn assign_local(&mut self, now: Instant) -> bool {
        let Some(local) = self.local.as_deref() else {
            return false;
        };
        // Every (holder, pending copy) pairing, best first. Only holders are visited: a
        // swarm's thousands of peers hold a task's bytes on a few. A pairing's key changes
        // only as its peer's free slots go down, so a popped key that is out of date is
        // pushed back with the current count (it can only have fallen), and the first
        // up-to-date one popped is the best there is. Places in `pending` are numbered once:
        // removals keep the others' order.
        type Key = (u64, u32, u64, Reverse<usize>, Reverse<usize>);
        let mut pairings = std::collections::BinaryHeap::new();
        for (at, &t) in self.pending.iter().enumerate() {
            for &(p, held) in &local[t] {
                if held == 0 || !self.has_slot(p) || self.dead[p] || !self.eligible(t, p) {
                    continue;
                }
                let share = held.saturating_mul(1 << 16) / self.bytes[t].max(1);
                let key: Key = (share, self.free[p], held, Reverse(p), Reverse(at));
                pairings.push((key, t));
            }
        }
        let mut taken = vec![false; self.pending.len()];
        let mut started = false;
        while let Some((key, t)) = pairings.pop() {
            let (share, free, held, Reverse(p), Reverse(at)) = key;
            if taken[at] || !self.has_slot(p) || self.dead[p] || !self.eligible(t, p) {
                continue;
            }
            if free != self.free[p] {
                pairings.push(((share, self.free[p], held, Reverse(p), Reverse(at)), t));
                continue;
            }
            taken[at] = true;
            self.last_local = Some(now);
            self.idle_since[p] = None;
            let now_at = at - taken[..at].iter().filter(|&&x| x).count();
            let t = self.pending.remove(now_at);
            self.start(t, p, now);
            started = true;
        }
        started
    }

    /// Gives peer `p` a task if one is right for it now; says whether it did.
    fn assign_to(&mut self, p: usize, now: Instant, stragglers: &[(usize, usize)]) -> bool {
        if self.pending.is_empty() && !self.back_up(p, stragglers) {
            return false;
        }
        let Some((at, score)) = self.pick(p) else {
            return false;
        };
        if self.local.is_some() && score == 0 {
            // Delay scheduling: wait a little for a task this peer holds, and while holders
            // keep starting theirs.
            let since = *self.idle_since[p].get_or_insert(now);
            if now.duration_since(since) < LOCALITY_DELAY
                || self
                    .last_local
                    .is_some_and(|l| now.duration_since(l) < LOCALITY_WAIT)
            {
                return false;
            }
        }
        if score > 0 {
            self.last_local = Some(now);
        }
        self.idle_since[p] = None;
        let t = self.pending.remove(at);
        self.start(t, p, now);
        true
    }

    /// The (task, peer) of the attempts that have run `after` or longer at `now`, of tasks
    /// not done, longest-running first (ties: the earlier attempt): the candidates for backup
    /// copies, found once per assignment round rather than once per free peer.
    fn stragglers(&self, now: Instant, after: Duration) -> Vec<(usize, usize)> {
        if self.verify > 1 {
            return Vec::new();
        }
        let mut slow: Vec<(Instant, AttemptId, usize, usize)> = self
            .running
            .iter()
            .filter(|(_, a)| !self.complete.contains(&a.t))
            .filter(|(_, a)| now.duration_since(a.since) >= after)
            .map(|(id, a)| (a.since, *id, a.t, a.p))
            .collect();
        slow.sort_unstable();
        slow.into_iter().map(|(_, _, t, p)| (t, p)).collect()
    }

    /// Near the end of the phase: peer `p` takes a backup copy of the task that has run
    /// longest (of `stragglers`), once it runs well past the usual time. Says whether it
    /// queued one.
    fn back_up(&mut self, p: usize, stragglers: &[(usize, usize)]) -> bool {
        let straggler = stragglers
            .iter()
            // A copy started while a cut is awaited could cover the rest too.
            .find(|(t, q)| *q != p && !self.backed.contains(t) && self.asked.get(t) != Some(&None))
            .copied();
        let Some((t, slow)) = straggler else {
            return false;
        };
        self.backed.insert(t);
        self.emit(Event::Backup {
            kind: self.kind,
            task: t as u32,
            slow: self.peers[slow].to_string(),
            peer: self.peers[p].to_string(),
        });
        self.pending.push(t);
        true
    }

    /// The pending task for peer `p` (its place in `pending`) and how many of its bytes `p`
    /// holds: the most local one (ties: the earliest place), else the earliest place.
    fn pick(&self, p: usize) -> Option<(usize, u64)> {
        let eligible = |t: usize| self.eligible(t, p);
        match self.local.as_deref() {
            Some(local) => {
                // The tasks `p` holds, not every pending one: a peer of a large swarm holds
                // a few.
                let most = self.held_by[p]
                    .iter()
                    .filter(|&&t| self.pending.contains(t) && eligible(t))
                    .map(|&t| held(local, t, p))
                    .max();
                let wanted = |t: usize| match most {
                    Some(most) => held(local, t, p) == most && eligible(t),
                    None => eligible(t),
                };
                self.pending
                    .iter()
                    .enumerate()
                    .find(|(_, &t)| wanted(t))
                    .map(|(i, _)| (i, most.unwrap_or(0)))
            }
            None => self
                .pending
                .iter()
                .enumerate()
                .rev()
                .find(|(_, &t)| eligible(t))
                .map(|(i, _)| (i, 0)),
        }
    }

    /// Whether peer `p` and its machine have a slot free.
    fn has_slot(&self, p: usize) -> bool {
        self.free[p] > 0 && self.machine_free[self.machine[p]] > 0
    }

    /// Gives back the slot a task of peer `p` held.
    fn release(&mut self, p: usize) {
        self.free[p] += 1;
        self.machine_free[self.machine[p]] += 1;
    }

    /// Whether peer `p` may take a copy of task `t`.
    fn eligible(&self, t: usize, p: usize) -> bool {
        // A task that failed on this peer goes elsewhere while there is elsewhere; nor does
        // a peer take a second copy of a task it is running, or one it answered for already
        // (verification compares distinct peers).
        self.failed.get(&t).is_none_or(|(_, on)| {
            !on.contains(&p) || on.len() >= self.dead.iter().filter(|d| !**d).count()
        }) && !self.running_pairs.contains(&(t, p))
            && !self
                .votes
                .get(&t)
                .is_some_and(|v| v.iter().any(|(q, _)| *q == p))
    }

    fn start(&mut self, t: usize, p: usize, now: Instant) {
        self.tally.attempts[t] += 1;
        match self.kind {
            TaskKind::Map => self.tally.counters.map_attempts += 1,
            TaskKind::Reduce => self.tally.counters.reduce_attempts += 1,
        }
        self.free[p] -= 1;
        self.machine_free[self.machine[p]] -= 1;
        let local_percent = match self.local.as_deref() {
            Some(local) if self.bytes[t] > 0 => (held(local, t, p) * 100 / self.bytes[t]) as u8,
            _ => 100,
        };
        let attempt = self.tally.attempts[t];
        self.emit(Event::TaskStarted {
            kind: self.kind,
            task: t as u32,
            attempt,
            peer: self.peers[p].to_string(),
            local_percent,
        });
        let id = self.next_id;
        self.next_id += 1;
        let skip = self.skips.of(t);
        let skipped = skip.len();
        self.running_pairs.insert((t, p));
        self.copies[t] += 1;
        self.running.insert(
            id,
            Attempt {
                t,
                p,
                since: now,
                skipped,
            },
        );
        self.actions.push(Action::Start(Start {
            id,
            task: t,
            peer: self.peers[p],
            attempt,
            skip,
        }));
    }

    /// The call of attempt `id` was aborted before it answered: the other copy won, or its
    /// peer was given up on (then it is retried as a failure of that peer).
    pub(crate) fn cancelled(&mut self, id: AttemptId, now: Instant) -> Result<(), Stop> {
        if self.beaten.remove(&id) {
            if let Some(a) = self.running.remove(&id) {
                self.running_pairs.remove(&(a.t, a.p));
                self.copies[a.t] -= 1;
                self.release(a.p);
            }
            return Ok(());
        }
        // An attempt aborted because its peer was given up on gets that reason in `answered`.
        let limit = self.liveness.as_secs_f64();
        let reason = format!("no answer to a liveness probe within {limit:.1}s");
        self.answered(id, Err(reason), now)
    }

    /// Attempt `id` answered (or its call failed with the reason).
    pub(crate) fn answered(
        &mut self,
        id: AttemptId,
        result: Result<JobResponse, String>,
        now: Instant,
    ) -> Result<(), Stop> {
        let Some(Attempt {
            t,
            p,
            since,
            skipped,
        }) = self.running.remove(&id)
        else {
            return Ok(());
        };
        self.running_pairs.remove(&(t, p));
        self.copies[t] -= 1;
        self.beaten.remove(&id);
        // Its peer was given up on while it ran (aborted, or answering before the abort
        // landed): its answer no longer counts, nor makes a second mismatch; the task runs
        // elsewhere.
        let result = match self.excluded.remove(&id) {
            true => Err("its output for another task disagreed with the majority".to_string()),
            false => result,
        };
        let (kind, peer) = (self.kind, self.peers[p]);
        if self.complete.contains(&t) {
            // The losing copy of a backed-up task answered before it could be stopped.
            if result.is_ok() {
                self.release(p);
            }
            return Ok(());
        }
        let mut ends_task =
            matches!(&result, Ok(JobResponse::MissingRuns(_))) && kind == TaskKind::Reduce;
        let what = kind.name();
        match result {
            Ok(JobResponse::MissingRuns(runs)) if kind == TaskKind::Reduce => {
                // Not this reducer's fault: the caller re-runs the maps and tries again.
                self.release(p);
                self.emit(Event::TaskFailed {
                    kind,
                    task: t as u32,
                    peer: peer.to_string(),
                    reason: format!("{} map output(s) could not be fetched", runs.len()),
                    retry: true,
                });
                self.done.push((t, JobResponse::MissingRuns(runs), peer));
            }
            Ok(response @ (JobResponse::MapDone(_) | JobResponse::ReduceDone(_))) => {
                let right_kind = matches!(
                    (&response, kind),
                    (JobResponse::MapDone(_), TaskKind::Map)
                        | (JobResponse::ReduceDone(_), TaskKind::Reduce)
                );
                if !right_kind {
                    return Err(format!(
                        "{peer} answered {what} task {t} with the wrong kind of result"
                    )
                    .into());
                }
                self.release(p);
                let took = now.duration_since(since);
                self.took.push(took);
                self.finished_bytes += self.bytes[t];
                self.finished_time += took;
                self.emit(Event::TaskFinished {
                    kind,
                    task: t as u32,
                    peer: peer.to_string(),
                    bytes: self.bytes[t],
                    millis: took.as_millis() as u64,
                });
                ends_task = self.vote(t, p, response, skipped);
            }
            Ok(busy) if busy.is_busy() => {
                // The worker's queue was full: not the task's fault.
                self.release(p);
                self.pending.push(t);
                self.tally.attempts[t] -= 1;
            }
            Ok(JobResponse::RecordFailed { reason, record })
                if kind == TaskKind::Map && self.skips.failed(t, record) =>
            {
                // The same record failed the task again: leave it out from now on (the task
                // starts afresh, with a new count of failures).
                self.release(p);
                self.skips.skip(t, record).map_err(|limit| {
                    format!(
                        "map task {t} failed again on the record at input offset {record}, \
                         and the job has already skipped its limit of {limit} bad records: \
                         {reason}"
                    )
                })?;
                self.failed.remove(&t);
                self.emit(Event::TaskFailed {
                    kind,
                    task: t as u32,
                    peer: peer.to_string(),
                    reason: format!("{reason}; skipping that record from now on"),
                    retry: true,
                });
                self.pending.push(t);
                // Outputs made before the record was left out are not comparable with those
                // made after: each of them runs again.
                for _ in self.votes.remove(&t).unwrap_or_default() {
                    self.pending.push(t);
                }
            }
            Ok(JobResponse::Failed(reason) | JobResponse::RecordFailed { reason, .. }) => {
                // The task failed by itself (trap, time or memory limit): try it on other
                // peers a bounded number of times, then fail the job with the reason.
                self.release(p);
                let (count, on) = self.failed.entry(t).or_default();
                *count += 1;
                on.insert(p);
                let retry = *count < TASK_FAILURES;
                self.retry_or_fail(t, peer, reason, retry, TASK_FAILURES)?;
                self.pending.push(t);
            }
            Ok(other) => {
                return Err(format!("{peer} answered {what} task {t} with {other:?}").into());
            }
            Err(reason) => {
                // The peer is unreachable or stalled: run the task elsewhere.
                self.dead[p] = true;
                self.tally.gone.insert(peer);
                let lost = self.lost.entry(t).or_default();
                *lost += 1;
                let retry = *lost < MAX_ATTEMPTS as u32;
                self.retry_or_fail(t, peer, reason, retry, MAX_ATTEMPTS)?;
                self.pending.push(t);
            }
        }
        if ends_task {
            // First copy home wins: stop the other, here and on its worker.
            self.complete.insert(t);
            self.pending.remove_all(t);
            let losers: Vec<(AttemptId, usize)> = self
                .running
                .iter()
                .filter(|(_, a)| a.t == t)
                .map(|(id, a)| (*id, a.p))
                .collect();
            for (id, p) in losers {
                self.beaten.insert(id);
                self.actions.push(Action::Abort(id));
                self.actions.push(Action::StopOnWorker {
                    peer: self.peers[p],
                    task: t,
                });
            }
        } else if self.verify == 1 && self.running.values().any(|a| a.t == t) {
            // Another copy is still running: it is the retry.
            self.pending.remove_all(t);
        }
        Ok(())
    }

    /// Peer `p` produced `response` for task `t`: the task's answer, unless its outputs are
    /// to be verified; then it is one vote, and the task is answered once all copies have
    /// answered and a majority agree (see the module docs). Says whether the task is done.
    fn vote(&mut self, t: usize, p: usize, response: JobResponse, skipped: usize) -> bool {
        if self.verify == 1 {
            self.done.push((t, response, self.peers[p]));
            return true;
        }
        if skipped != self.skips.of(t).len() {
            // Made before a bad record was left out: run again with the current list.
            self.pending.push(t);
            return false;
        }
        let votes = self.votes.entry(t).or_default();
        votes.push((p, response));
        if votes.len() < self.verify {
            return false;
        }
        let keys: Vec<Vec<Option<Cid>>> = votes.iter().map(|(_, r)| output_key(r)).collect();
        let (best, count) = keys
            .iter()
            .map(|k| (k, keys.iter().filter(|o| *o == k).count()))
            .max_by_key(|(_, n)| *n)
            .expect("at least one vote");
        if count <= self.verify / 2 {
            // No majority yet: one more copy, on a peer that has not run it.
            *self.extra.entry(t).or_default() += 1;
            self.pending.push(t);
            return false;
        }
        let best = best.clone();
        let votes = self.votes.remove(&t).expect("voted");
        let (agreed, dissent): (Vec<_>, Vec<_>) = votes
            .into_iter()
            .zip(keys)
            .partition(|(_, key)| *key == best);
        if !dissent.is_empty() {
            self.emit(Event::VerifyMismatch {
                kind: self.kind,
                task: t as u32,
                agreed: agreed
                    .iter()
                    .map(|((q, _), _)| self.peers[*q].to_string())
                    .collect(),
                dissent: dissent
                    .iter()
                    .map(|((q, _), _)| self.peers[*q].to_string())
                    .collect(),
            });
            for ((q, _), _) in &dissent {
                self.exclude(*q);
            }
        }
        let ((first, response), _) = agreed.into_iter().next().expect("a majority");
        self.done.push((t, response, self.peers[first]));
        true
    }

    /// Gives up on peer `p` for the rest of the job (its output disagreed with the majority):
    /// its outputs for tasks not yet decided no longer count, and its running attempts are
    /// aborted; each runs again elsewhere.
    fn exclude(&mut self, p: usize) {
        if self.dead[p] {
            return;
        }
        self.dead[p] = true;
        self.tally.gone.insert(self.peers[p]);
        for (&t, votes) in &mut self.votes {
            let before = votes.len();
            votes.retain(|(q, _)| *q != p);
            for _ in votes.len()..before {
                self.pending.push(t);
            }
        }
        let running: Vec<AttemptId> = self
            .running
            .iter()
            .filter(|(_, a)| a.p == p)
            .map(|(id, _)| *id)
            .collect();
        for id in running {
            self.excluded.insert(id);
            self.actions.push(Action::Abort(id));
        }
    }

    /// The peers to probe now: every other peer running a task of ours that is not being
    /// probed already.
    pub(crate) fn probe_targets(&mut self) -> Vec<(usize, PeerId)> {
        let busy: HashSet<usize> = self.running.values().map(|a| a.p).collect();
        let mut targets: Vec<(usize, PeerId)> = busy
            .into_iter()
            .filter(|&p| self.peers[p] != self.me && !self.dead[p])
            .filter(|&p| self.probing.insert(p))
            .map(|p| (p, self.peers[p]))
            .collect();
        targets.sort_unstable_by_key(|(p, _)| *p);
        targets
    }

    /// Peer `p` answered its probe in time, or not: then it is stalled or cut off, and the
    /// job gives up on it; its attempts are aborted and come back through
    /// [`cancelled`](Self::cancelled) to be retried elsewhere.
    pub(crate) fn probed(&mut self, p: usize, alive: bool) {
        self.probing.remove(&p);
        if alive || self.dead[p] {
            return;
        }
        self.dead[p] = true;
        self.tally.gone.insert(self.peers[p]);
        let stalled: Vec<AttemptId> = self
            .running
            .iter()
            .filter(|(_, a)| a.p == p)
            .map(|(id, _)| *id)
            .collect();
        self.actions.extend(stalled.into_iter().map(Action::Abort));
    }

    /// Tells watchers attempt `t` failed on `peer`; unless it is to be retried, the job fails
    /// with the reason (`limit` attempts were made).
    fn retry_or_fail(
        &mut self,
        t: usize,
        peer: PeerId,
        reason: String,
        retry: bool,
        limit: usize,
    ) -> Result<(), Stop> {
        self.emit(Event::TaskFailed {
            kind: self.kind,
            task: t as u32,
            peer: peer.to_string(),
            reason: reason.clone(),
            retry,
        });
        if retry {
            return Ok(());
        }
        let what = self.kind.name();
        Err(format!("{what} task {t} failed {limit} times; last on {peer}: {reason}").into())
    }

    fn emit(&mut self, event: Event) {
        self.actions.push(Action::Emit(event));
    }
}

/// What verification compares of a task's answer: the CIDs it produced (the counters differ
/// from peer to peer, as they count local and fetched bytes).
/// Bytes of task `t` that peer `p` holds (`local` as in [`Schedule::local`]).
pub(crate) fn held(local: &[Vec<(usize, u64)>], t: usize, p: usize) -> u64 {
    local[t]
        .binary_search_by_key(&p, |&(q, _)| q)
        .map_or(0, |i| local[t][i].1)
}

/// The tasks waiting for a peer, the next one last, and how many copies of each wait.
struct Pending {
    order: Vec<usize>,
    count: Vec<u32>,
}

impl Pending {
    fn new(order: Vec<usize>, tasks: usize) -> Self {
        let mut count = vec![0; tasks];
        for &t in &order {
            count[t] += 1;
        }
        Self { order, count }
    }

    fn contains(&self, t: usize) -> bool {
        self.count[t] > 0
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn last(&self) -> Option<usize> {
        self.order.last().copied()
    }

    fn iter(&self) -> std::slice::Iter<'_, usize> {
        self.order.iter()
    }

    fn push(&mut self, t: usize) {
        self.order.push(t);
        self.count[t] += 1;
    }

    /// Makes room for tasks numbered below `tasks`.
    fn grow(&mut self, tasks: usize) {
        if self.count.len() < tasks {
            self.count.resize(tasks, 0);
        }
    }

    /// Takes the task at place `at`.
    fn remove(&mut self, at: usize) -> usize {
        let t = self.order.remove(at);
        self.count[t] -= 1;
        t
    }

    /// Drops every copy of task `t`.
    fn remove_all(&mut self, t: usize) {
        if self.count[t] > 0 {
            self.order.retain(|&x| x != t);
            self.count[t] = 0;
        }
    }
}

fn output_key(response: &JobResponse) -> Vec<Option<Cid>> {
    match response {
        JobResponse::MapDone(out) => out
            .parts
            .iter()
            .map(|p| p.as_ref().map(|p| p.cid))
            .collect(),
        JobResponse::ReduceDone(out) => vec![Some(out.cid)],
        _ => Vec::new(),
    }
}

/// How long a task runs before an idle peer takes a backup copy of it, once nothing is left to
/// assign: [`BACKUP_FACTOR`] times the phase's median task time so far, at least
/// [`BACKUP_MIN`]; [`BACKUP_BLIND`] while no task of the phase has finished.
fn backup_after(took: &mut [Duration]) -> Duration {
    if took.is_empty() {
        return BACKUP_BLIND;
    }
    let mid = took.len() / 2;
    let (_, median, _) = took.select_nth_unstable(mid);
    (*median * BACKUP_FACTOR).max(BACKUP_MIN)
}

/// Bad records of a job's map tasks (`--skip-bad-records`): how often each failed its task,
/// and those to leave out, per task. A record is skipped once it has failed twice, as in the
/// MapReduce paper, at most `limit` records in all.
#[derive(Debug, Default)]
pub(crate) struct Skips {
    limit: u32,
    failures: HashMap<(usize, u64), u32>,
    skipped: HashMap<usize, Vec<u64>>,
}

impl Skips {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Counts a failure of task `t` on `record`; says whether the record is now to be skipped.
    fn failed(&mut self, t: usize, record: u64) -> bool {
        if self.limit == 0 {
            return false;
        }
        let n = self.failures.entry((t, record)).or_default();
        *n += 1;
        *n >= 2
    }

    /// Leaves `record` out of task `t` from now on; the limit is the error if it is reached.
    fn skip(&mut self, t: usize, record: u64) -> Result<(), u32> {
        if self.skipped.get(&t).is_some_and(|l| l.contains(&record)) {
            // Another copy of the task found it too.
            return Ok(());
        }
        let total: usize = self.skipped.values().map(Vec::len).sum();
        if total >= self.limit as usize {
            return Err(self.limit);
        }
        let list = self.skipped.entry(t).or_default();
        if let Err(at) = list.binary_search(&record) {
            list.insert(at, record);
        }
        Ok(())
    }

    /// The sorted offsets to leave out of task `t`.
    fn of(&self, t: usize) -> Vec<u64> {
        self.skipped.get(&t).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::engine::{MapOutput, ReduceOutput, RunRef};

    /// The owned data a phase borrows, and a clock that starts at `t0`.
    struct Fixture {
        kind: TaskKind,
        peers: Vec<PeerId>,
        slots: Vec<u32>,
        machines: Option<(Vec<usize>, Vec<u32>)>,
        local: Option<Vec<Vec<(usize, u64)>>>,
        bytes: Vec<u64>,
        skips: Skips,
        counters: Counters,
        attempts: Vec<u32>,
        gone: HashSet<PeerId>,
        verify: usize,
        t0: Instant,
    }

    impl Fixture {
        /// `tasks` reduce tasks on `peers` peers with `slots` slots each.
        fn new(kind: TaskKind, tasks: usize, peers: usize, slots: u32) -> Self {
            Self {
                kind,
                peers: (0..peers).map(|_| PeerId::random()).collect(),
                slots: vec![slots; peers],
                machines: None,
                local: None,
                bytes: vec![100; tasks],
                skips: Skips::new(0),
                counters: Counters::default(),
                attempts: vec![0; tasks],
                gone: HashSet::new(),
                verify: 1,
                t0: Instant::now(),
            }
        }

        /// Every task runs on `k` peers whose outputs must agree.
        fn verified(mut self, k: usize) -> Self {
            self.verify = k;
            self
        }

        /// Map tasks whose bytes each peer holds: `local[task][peer]`.
        fn with_local(mut self, local: Vec<Vec<u64>>) -> Self {
            let holders = local
                .into_iter()
                .map(|task| {
                    task.into_iter()
                        .enumerate()
                        .filter(|&(_, held)| held > 0)
                        .collect()
                })
                .collect();
            self.local = Some(holders);
            self
        }

        /// The phase, run by a coordinator that is none of the peers, every peer connected.
        fn state(&mut self) -> PhaseState<'_> {
            let me = PeerId::random();
            self.state_connected(me, |_| true)
        }

        fn state_connected(
            &mut self,
            me: PeerId,
            connected: impl Fn(&PeerId) -> bool,
        ) -> PhaseState<'_> {
            let tasks = (0..self.attempts.len()).collect();
            PhaseState::new(
                Schedule {
                    kind: self.kind,
                    peers: &self.peers,
                    slots: &self.slots,
                    machines: self.machines.as_ref().map(|(of, n)| (&of[..], &n[..])),
                    local: self.local.clone(),
                    bytes: self.bytes.clone(),
                    tasks,
                    skips: &mut self.skips,
                    verify: self.verify,
                },
                Tally {
                    counters: &mut self.counters,
                    attempts: &mut self.attempts,
                    gone: &mut self.gone,
                },
                me,
                Duration::from_secs(3),
                connected,
            )
        }
    }

    fn at(t0: Instant, millis: u64) -> Instant {
        t0 + Duration::from_millis(millis)
    }

    /// The starts among `actions`: (attempt, task, peer index, skip list).
    fn starts(actions: &[Action], peers: &[PeerId]) -> Vec<(AttemptId, usize, usize, Vec<u64>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(s) => {
                    let p = peers.iter().position(|p| *p == s.peer).expect("a peer");
                    Some((s.id, s.task, p, s.skip.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// The (task, peer index) of each start among `actions`.
    fn placed(actions: &[Action], peers: &[PeerId]) -> Vec<(usize, usize)> {
        starts(actions, peers)
            .into_iter()
            .map(|(_, t, p, _)| (t, p))
            .collect()
    }

    fn events(actions: &[Action]) -> Vec<&Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn map_done() -> Result<JobResponse, String> {
        Ok(JobResponse::MapDone(MapOutput {
            parts: vec![],
            counters: Counters::default(),
            cut: None,
        }))
    }

    fn reduce_done() -> Result<JobResponse, String> {
        Ok(JobResponse::ReduceDone(ReduceOutput {
            cid: *p2pmr_protocol::Block::raw(b"part".to_vec()).cid(),
            size: 4,
            tsize: 4,
            counters: Counters::default(),
        }))
    }

    /// A reduce answer whose output is the part `name`.
    fn part(name: &str) -> Result<JobResponse, String> {
        Ok(JobResponse::ReduceDone(ReduceOutput {
            cid: *p2pmr_protocol::Block::raw(name.as_bytes().to_vec()).cid(),
            size: 4,
            tsize: 4,
            counters: Counters::default(),
        }))
    }

    fn mismatches(actions: &[Action]) -> Vec<(usize, Vec<String>, Vec<String>)> {
        events(actions)
            .into_iter()
            .filter_map(|e| match e {
                Event::VerifyMismatch {
                    task,
                    agreed,
                    dissent,
                    ..
                } => Some((*task as usize, agreed.clone(), dissent.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn verified_tasks_run_on_distinct_peers_and_agreeing_answers_end_them() {
        // Two tasks, each on 2 of 3 peers with 2 slots: never two copies on one peer.
        let mut f = Fixture::new(TaskKind::Reduce, 2, 3, 2).verified(2);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        assert_eq!(first.len(), 4);
        for t in 0..2 {
            let on: HashSet<usize> = first.iter().filter(|x| x.1 == t).map(|x| x.2).collect();
            assert_eq!(on.len(), 2, "task {t} on distinct peers: {first:?}");
        }
        let of = |t: usize| -> Vec<AttemptId> {
            first.iter().filter(|x| x.1 == t).map(|x| x.0).collect()
        };
        // One answer is not enough; the second, agreeing, ends the task.
        s.answered(of(0)[0], part("a"), at(t0, 10)).unwrap();
        assert!(!s.is_done());
        assert!(s.done.is_empty());
        s.answered(of(0)[1], part("a"), at(t0, 20)).unwrap();
        assert_eq!(s.done.len(), 1);
        // No backup copies: the copies already race.
        s.assign(at(t0, 60_000));
        assert!(starts(&s.take_actions(), &peers).is_empty());
        for id in of(1) {
            s.answered(id, part("b"), at(t0, 30)).unwrap();
        }
        assert!(s.is_done());
        assert!(mismatches(&s.take_actions()).is_empty());
        assert!(s.tally.gone.is_empty());
        // Each task once, with the output agreed on.
        let done = s.into_done();
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].1, part("b").unwrap());
    }

    #[test]
    fn a_disagreement_runs_the_task_on_another_peer_and_the_dissenter_is_excluded() {
        let mut f = Fixture::new(TaskKind::Reduce, 2, 3, 1).verified(2);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        // Task 0 on peers 0 and 1; task 1 on peer 2 (one slot each).
        assert_eq!(
            first.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (1, 2)]
        );
        s.answered(first[0].0, part("right"), at(t0, 10)).unwrap();
        s.answered(first[1].0, part("wrong"), at(t0, 10)).unwrap();
        assert!(s.done.is_empty(), "no majority of 2 yet");
        s.take_actions();
        // Peer 2 is busy with task 1; once it answers, it takes the third copy of task 0
        // (peers 0 and 1 ran it already), and then task 1's second copy goes to peer 0 or 1.
        s.assign(at(t0, 20));
        let next = starts(&s.take_actions(), &peers);
        assert!(
            next.iter().all(|x| x.1 == 1 && x.2 != 2),
            "only task 1's second copy can start now, not on peer 2: {next:?}"
        );
        s.answered(first[2].0, part("one"), at(t0, 30)).unwrap();
        s.assign(at(t0, 30));
        let third = starts(&s.take_actions(), &peers);
        let copy = third
            .iter()
            .find(|x| x.1 == 0)
            .expect("a third copy of task 0");
        assert_eq!(copy.2, 2);
        s.answered(copy.0, part("right"), at(t0, 40)).unwrap();
        let actions = s.take_actions();
        let found = mismatches(&actions);
        assert_eq!(
            found,
            vec![(
                0,
                vec![peers[0].to_string(), peers[2].to_string()],
                vec![peers[1].to_string()]
            )]
        );
        // The dissenter is given up on: its running copy of task 1 is aborted and runs
        // elsewhere, and it takes nothing more.
        assert!(s.tally.gone.contains(&peers[1]));
        let on_1: Vec<AttemptId> = next.iter().filter(|x| x.2 == 1).map(|x| x.0).collect();
        for id in &on_1 {
            assert!(actions.contains(&Action::Abort(*id)), "{actions:?}");
            s.cancelled(*id, at(t0, 41)).unwrap();
        }
        let failed = events(&s.take_actions())
            .into_iter()
            .any(|e| matches!(e, Event::TaskFailed { reason, retry: true, .. } if reason.contains("disagreed")));
        assert_eq!(failed, !on_1.is_empty());
        s.assign(at(t0, 50));
        let rest = starts(&s.take_actions(), &peers);
        assert!(rest.iter().all(|x| x.2 != 1), "{rest:?}");
        for x in rest.iter().chain(next.iter().filter(|x| x.2 != 1)) {
            s.answered(x.0, part("one"), at(t0, 60)).unwrap();
        }
        assert!(s.is_done());
        let done = s.into_done();
        assert_eq!(done[0].1, part("right").unwrap());
        assert_eq!(done[1].1, part("one").unwrap());
    }

    #[test]
    fn an_answer_of_an_excluded_peer_that_beats_its_abort_does_not_count() {
        // Two tasks on 3 peers with 2 slots, 2 copies each: some peer runs both tasks.
        let mut f = Fixture::new(TaskKind::Reduce, 2, 3, 2).verified(2);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        let on = |t: usize, p: usize| first.iter().find(|x| x.1 == t && x.2 == p).map(|x| x.0);
        let bad = (0..3)
            .find(|&p| on(0, p).is_some() && on(1, p).is_some())
            .expect("a peer with both tasks");
        let good = (0..3)
            .find(|&p| p != bad && on(0, p).is_some())
            .expect("task 0's other copy");
        let other = (0..3)
            .find(|&p| p != bad && on(1, p).is_some())
            .expect("task 1's other copy");
        // Task 0: the bad peer disagrees; a third copy, elsewhere, outvotes it.
        s.answered(on(0, bad).unwrap(), part("wrong"), at(t0, 10))
            .unwrap();
        s.answered(on(0, good).unwrap(), part("right"), at(t0, 10))
            .unwrap();
        s.answered(on(1, other).unwrap(), part("one"), at(t0, 15))
            .unwrap();
        s.assign(at(t0, 20));
        let third = starts(&s.take_actions(), &peers);
        let copy = third.iter().find(|x| x.1 == 0).expect("a third copy");
        s.answered(copy.0, part("right"), at(t0, 30)).unwrap();
        let actions = s.take_actions();
        assert_eq!(mismatches(&actions).len(), 1);
        let late = on(1, bad).unwrap();
        assert!(actions.contains(&Action::Abort(late)));
        // Its copy of task 1 answers before the abort lands, and then the abort's end.
        s.answered(late, part("late"), at(t0, 31)).unwrap();
        s.cancelled(late, at(t0, 32)).unwrap();
        let after = s.take_actions();
        assert!(mismatches(&after).is_empty(), "{after:?}");
        assert!(events(&after).into_iter().any(|e| matches!(e,
            Event::TaskFailed { reason, retry: true, .. } if reason.contains("disagreed"))));
        // Task 1 runs again, not on the bad peer, and ends with the agreed answer.
        s.assign(at(t0, 40));
        let again = starts(&s.take_actions(), &peers);
        assert!(again.iter().all(|x| x.2 != bad && x.1 == 1), "{again:?}");
        for x in &again {
            s.answered(x.0, part("one"), at(t0, 50)).unwrap();
        }
        assert!(s.is_done());
        assert_eq!(s.into_done()[1].1, part("one").unwrap());
    }

    #[test]
    fn a_majority_of_three_outvotes_one_and_no_majority_with_no_peer_left_is_stuck() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 3, 1).verified(3);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        assert_eq!(first.len(), 3);
        s.answered(first[0].0, part("x"), at(t0, 10)).unwrap();
        s.answered(first[1].0, part("x"), at(t0, 10)).unwrap();
        assert!(s.done.is_empty(), "waits for all three");
        s.answered(first[2].0, part("y"), at(t0, 10)).unwrap();
        assert!(s.is_done());
        let found = mismatches(&s.take_actions());
        assert_eq!(found[0].2, vec![peers[2].to_string()]);

        // Two peers that disagree, and no third: the job cannot go on.
        let mut f = Fixture::new(TaskKind::Reduce, 1, 2, 1).verified(2);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        s.answered(first[0].0, part("x"), at(t0, 10)).unwrap();
        s.answered(first[1].0, part("y"), at(t0, 10)).unwrap();
        s.assign(at(t0, 20));
        assert!(starts(&s.take_actions(), &peers).is_empty());
        let Some(Stop::Failed(reason)) = s.stuck() else {
            panic!("stuck")
        };
        assert!(reason.contains("majority of 2"), "{reason}");
    }

    #[test]
    fn verified_copies_made_with_another_skip_list_are_not_compared() {
        // Both copies of map task 0 fail on record 7 twice in all: it is skipped, and the
        // copies run again with it left out.
        let mut f = Fixture::new(TaskKind::Map, 1, 3, 1).verified(2);
        f.skips = Skips::new(5);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        s.assign(t0 + LOCALITY_DELAY);
        let first = starts(&s.take_actions(), &peers);
        assert_eq!(first.len(), 2);
        let bad = || {
            Ok(JobResponse::RecordFailed {
                reason: "trap".into(),
                record: 7,
            })
        };
        s.answered(first[0].0, bad(), at(t0, 400)).unwrap();
        s.answered(first[1].0, bad(), at(t0, 400)).unwrap();
        s.assign(at(t0, 1000));
        let again = starts(&s.take_actions(), &peers);
        assert_eq!(again.len(), 2, "{again:?}");
        assert!(again.iter().all(|x| x.3 == vec![7]));
        for x in &again {
            s.answered(x.0, map_done(), at(t0, 1100)).unwrap();
        }
        assert!(s.is_done());

        // A copy that answered, or was still running, with the old list when the record is
        // skipped: its output is not compared, and the task needs two copies made with the
        // new list.
        for answered_first in [false, true] {
            let mut f = Fixture::new(TaskKind::Map, 1, 3, 1).verified(2);
            f.skips = Skips::new(5);
            let (t0, peers) = (f.t0, f.peers.clone());
            let mut s = f.state();
            s.assign(t0 + LOCALITY_DELAY);
            let first = starts(&s.take_actions(), &peers);
            s.answered(first[1].0, bad(), at(t0, 400)).unwrap();
            s.assign(at(t0, 1000));
            let third = starts(&s.take_actions(), &peers);
            assert_eq!(third.len(), 1);
            if answered_first {
                s.answered(first[0].0, map_done(), at(t0, 1050)).unwrap();
            }
            s.answered(third[0].0, bad(), at(t0, 1100)).unwrap();
            if !answered_first {
                s.answered(first[0].0, map_done(), at(t0, 1200)).unwrap();
            }
            s.assign(at(t0, 2000));
            let fresh = starts(&s.take_actions(), &peers);
            assert_eq!(fresh.len(), 2, "{fresh:?}");
            assert!(fresh.iter().all(|x| x.3 == vec![7]));
            s.answered(fresh[0].0, map_done(), at(t0, 2100)).unwrap();
            assert!(!s.is_done(), "the stale output does not count");
            s.answered(fresh[1].0, map_done(), at(t0, 2100)).unwrap();
            assert!(s.is_done());
        }
    }

    #[test]
    fn tasks_spread_one_per_peer_per_round() {
        let mut f = Fixture::new(TaskKind::Reduce, 4, 2, 2);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let placed = placed(&s.take_actions(), &peers);
        assert_eq!(placed, vec![(0, 0), (1, 1), (2, 0), (3, 1)]);
    }

    #[test]
    fn a_peer_takes_the_map_task_it_holds_most_of() {
        // Task 1 is on peer 0, task 0 on peer 1, task 2 nowhere: in order, peer 0 would take
        // task 0 and peer 1 task 1.
        let local = vec![vec![0, 50], vec![100, 0], vec![0, 0]];
        let mut f = Fixture::new(TaskKind::Map, 3, 2, 1).with_local(local);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let placed = placed(&s.take_actions(), &peers);
        assert_eq!(placed, vec![(1, 0), (0, 1)]);
        assert_eq!(s.tally.counters.map_attempts, 2);
    }

    #[test]
    fn a_machine_runs_no_more_tasks_than_its_slots_whichever_daemons_run_them() {
        // Four daemons on one machine with two slots, each offering two. Daemon 0 holds
        // nothing; tasks 0 and 3 are on daemon 1, task 1 on 2, task 2 on 3.
        let holder = [1, 2, 3, 1];
        let local = holder
            .iter()
            .map(|&h| (0..4).map(|p| if p == h { 100 } else { 0 }).collect())
            .collect();
        let mut f = Fixture::new(TaskKind::Map, 4, 4, 2).with_local(local);
        f.machines = Some((vec![0; 4], vec![2]));
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(
            first.iter().all(|x| holder[x.1] == x.2),
            "on holders: {first:?}"
        );
        s.assign(at(t0, 2000));
        assert!(
            starts(&s.take_actions(), &peers).is_empty(),
            "the machine is full"
        );
        // Daemon 0 has been idle long past every delay when a slot frees: the slot still goes
        // to a daemon holding a pending task.
        s.answered(first[0].0, map_done(), at(t0, 2000)).unwrap();
        s.assign(at(t0, 2000));
        let next = starts(&s.take_actions(), &peers);
        assert_eq!(next.len(), 1, "{next:?}");
        assert_eq!(holder[next[0].1], next[0].2, "on its holder: {next:?}");
    }

    #[test]
    fn a_peer_without_local_tasks_waits_before_taking_a_remote_one() {
        // Both tasks are on peer 0, which has one slot; peer 1 holds neither.
        let mut f =
            Fixture::new(TaskKind::Map, 2, 2, 1).with_local(vec![vec![100, 0], vec![100, 0]]);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        assert_eq!(starts(&s.take_actions(), &peers).len(), 1, "peer 0 only");
        s.assign(at(t0, 100));
        assert!(
            starts(&s.take_actions(), &peers).is_empty(),
            "peer 1 still waits"
        );
        s.assign(t0 + LOCALITY_DELAY);
        assert!(
            starts(&s.take_actions(), &peers).is_empty(),
            "peer 0 started a local task under a second ago"
        );
        s.assign(t0 + LOCALITY_WAIT);
        let late = starts(&s.take_actions(), &peers);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].2, 1, "peer 1 takes it once the delay is over");
    }

    #[test]
    fn a_straggler_gets_a_backup_copy_and_the_first_copy_home_wins() {
        let mut f = Fixture::new(TaskKind::Reduce, 2, 2, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        let (a0, a1) = (first[0].0, first[1].0);
        // Task 0 takes 1 s, so a backup may start once task 1 has run 2 s.
        s.answered(a0, reduce_done(), at(t0, 1000)).unwrap();
        s.take_actions();
        s.assign(at(t0, 1500));
        assert!(
            starts(&s.take_actions(), &peers).is_empty(),
            "not yet a straggler"
        );
        s.assign(at(t0, 2000));
        let actions = s.take_actions();
        assert!(events(&actions)
            .iter()
            .any(|e| matches!(e, Event::Backup { task: 1, .. })));
        let backup = starts(&actions, &peers);
        assert_eq!(backup.len(), 1);
        assert_eq!(
            (backup[0].1, backup[0].2),
            (1, 0),
            "the idle peer copies task 1"
        );
        // The backup finishes first: the original is dropped here and stopped on its worker.
        s.answered(backup[0].0, reduce_done(), at(t0, 2500))
            .unwrap();
        let actions = s.take_actions();
        assert!(actions.contains(&Action::Abort(a1)));
        assert!(actions.contains(&Action::StopOnWorker {
            peer: peers[1],
            task: 1
        }));
        assert!(s.is_done());
        // Its cancelled call is no failure; a late answer of the loser would be ignored too.
        s.cancelled(a1, at(t0, 2600)).unwrap();
        assert!(events(&s.take_actions()).is_empty());
        assert_eq!(s.into_done().len(), 2);
    }

    /// The cut requests among `actions`: (task, peer index).
    fn cuts(actions: &[Action], peers: &[PeerId]) -> Vec<(usize, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Cut { peer, task } => {
                    Some((*task, peers.iter().position(|p| p == peer).expect("a peer")))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_free_slot_at_the_end_of_the_map_phase_cuts_the_task_with_most_left() {
        const M: u64 = MIN_SPLIT_PART;
        // Three map tasks on 2 peers of 1 slot, both holding everything: two run, one waits.
        let mut f = Fixture::new(TaskKind::Map, 3, 2, 1).with_local(vec![
            vec![8 * M; 2],
            vec![16 * M; 2],
            vec![2 * M; 2],
        ]);
        f.bytes = vec![8 * M, 16 * M, 2 * M];
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        assert_eq!(first.len(), 2);
        let small = first.iter().find(|a| a.1 == 0).expect("task 0 runs");
        let big = first.iter().find(|a| a.1 == 1).expect("task 1 runs");
        // Task 0 ends after 1 s; the waiting task takes its slot: nothing to cut yet.
        s.answered(small.0, map_done(), at(t0, 1000)).unwrap();
        s.assign(at(t0, 1000));
        let actions = s.take_actions();
        assert!(cuts(&actions, &peers).is_empty());
        let third = starts(&actions, &peers);
        assert_eq!((third[0].1, third[0].2), (2, small.2));
        // It ends 250 ms later: at the phase's rate (8 M/s) task 1 has 6 M left of 16 M.
        s.answered(third[0].0, map_done(), at(t0, 1250)).unwrap();
        s.take_actions();
        s.assign(at(t0, 1250));
        let actions = s.take_actions();
        assert_eq!(cuts(&actions, &peers), vec![(1, big.2)]);
        assert!(starts(&actions, &peers).is_empty());
        // Asked once while the answer is awaited.
        s.assign(at(t0, 1300));
        assert!(cuts(&s.take_actions(), &peers).is_empty());
        // Cut at 12 M: the rest is task 3, which the free peer takes.
        s.cut_answered(1, at(t0, 1310));
        let rest = Rest {
            kept: 12 * M,
            bytes: 4 * M,
            local: vec![(0, 4 * M), (1, 4 * M)],
        };
        assert_eq!(s.cut(1, 12 * M, rest, at(t0, 1310)), 3);
        s.assign(at(t0, 1310));
        let actions = s.take_actions();
        assert!(events(&actions).contains(&&Event::Split {
            task: 1,
            at: 12 * M,
            rest: 3
        }));
        let fourth = starts(&actions, &peers);
        assert_eq!((fourth[0].1, fourth[0].2), (3, small.2));
        s.answered(big.0, map_done(), at(t0, 1800)).unwrap();
        assert!(!s.is_done(), "the rest is still running");
        let finished: Vec<u64> = events(&s.take_actions())
            .iter()
            .filter_map(|e| match e {
                Event::TaskFinished { task: 1, bytes, .. } => Some(*bytes),
                _ => None,
            })
            .collect();
        assert_eq!(finished, vec![12 * M], "task 1 now covers what it kept");
        s.answered(fourth[0].0, map_done(), at(t0, 1900)).unwrap();
        assert!(s.is_done());
        let done: Vec<usize> = s.into_done().into_iter().map(|d| d.0).collect();
        assert_eq!(done, vec![0, 1, 2, 3]);
        assert_eq!(f.attempts, vec![1, 1, 1, 1]);
    }

    #[test]
    fn a_task_slower_than_the_phase_is_asked_to_cut_though_its_guess_says_it_is_done() {
        const M: u64 = MIN_SPLIT_PART;
        let mut f = Fixture::new(TaskKind::Map, 2, 2, 1);
        f.bytes = vec![4 * M, 16 * M];
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let first = starts(&s.take_actions(), &peers);
        let quick = first.iter().find(|a| a.1 == 0).expect("task 0 runs");
        let slow = first.iter().find(|a| a.1 == 1).expect("task 1 runs");
        // Task 0 went at 16 M/s; by that rate task 1 would be done after 1 s, but it is not.
        s.answered(quick.0, map_done(), at(t0, 250)).unwrap();
        s.take_actions();
        s.assign(at(t0, 1250));
        assert_eq!(cuts(&s.take_actions(), &peers), vec![(1, slow.2)]);
    }

    #[test]
    fn a_refused_cut_is_asked_again_later_and_never_with_verification_or_for_reduces() {
        const M: u64 = MIN_SPLIT_PART;
        let one_task = |kind, verify| {
            let mut f = Fixture::new(kind, 1, 2, 1).verified(verify);
            f.bytes = vec![64 * M];
            f
        };
        let mut f = one_task(TaskKind::Map, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let running = starts(&s.take_actions(), &peers)[0].clone();
        // Not before its worker can have the task; the caller is told when to look again.
        assert!(cuts(&s.take_actions(), &peers).is_empty());
        assert_eq!(s.next_wake(), Some(t0 + CUT_AFTER));
        s.assign(t0 + CUT_AFTER / 2);
        assert!(cuts(&s.take_actions(), &peers).is_empty());
        s.assign(t0 + CUT_AFTER);
        assert_eq!(cuts(&s.take_actions(), &peers), vec![(0, running.2)]);
        assert_eq!(s.next_wake(), None, "the answer is awaited");
        // Refused (say, the module was still loading): asked again a while later.
        let refused = at(t0, 200);
        s.cut_answered(0, refused);
        s.assign(refused + CUT_AGAIN / 2);
        assert!(cuts(&s.take_actions(), &peers).is_empty());
        assert_eq!(s.next_wake(), Some(refused + CUT_AGAIN));
        s.assign(refused + CUT_AGAIN);
        assert_eq!(cuts(&s.take_actions(), &peers), vec![(0, running.2)]);
        // While the cut is awaited, the straggler gets no backup copy: started now, it would
        // cover the rest too.
        s.assign(at(t0, 20_000));
        let actions = s.take_actions();
        assert!(starts(&actions, &peers).is_empty(), "{actions:?}");
        s.cut_answered(0, at(t0, 20_000));
        s.assign(at(t0, 20_000));
        assert_eq!(starts(&s.take_actions(), &peers).len(), 1, "a backup");
        for (kind, verify) in [(TaskKind::Map, 2), (TaskKind::Reduce, 1)] {
            let mut f = one_task(kind, verify);
            let t0 = f.t0;
            let mut s = f.state();
            for ms in [0, 100, 1000, 5000] {
                s.assign(at(t0, ms));
                let actions = s.take_actions();
                assert!(!actions.iter().any(|a| matches!(a, Action::Cut { .. })));
            }
        }
    }

    #[test]
    fn a_peer_that_fails_is_given_up_on_and_the_task_retried_up_to_the_limit() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, MAX_ATTEMPTS + 1, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        let mut used = HashSet::new();
        for n in 1..=MAX_ATTEMPTS {
            s.assign(t0);
            let started = starts(&s.take_actions(), &peers);
            assert_eq!(started.len(), 1);
            let (id, _, p, _) = started[0];
            assert!(used.insert(p), "a failed peer takes no more tasks");
            let outcome = s.answered(id, Err("connection closed".into()), t0);
            let failed = events(&s.take_actions()).into_iter().any(
                |e| matches!(e, Event::TaskFailed { retry, .. } if *retry == (n < MAX_ATTEMPTS)),
            );
            assert!(failed);
            assert_eq!(outcome.is_err(), n == MAX_ATTEMPTS, "attempt {n}");
            assert!(s.tally.gone.contains(&peers[p]));
        }
    }

    #[test]
    fn outputs_lost_in_earlier_rounds_do_not_count_against_a_task() {
        // The task ran (and its output died with its holder) many times before this round.
        let mut f = Fixture::new(TaskKind::Map, 1, 3, 1);
        f.attempts[0] = 2 * MAX_ATTEMPTS as u32;
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let (id, _, _, _) = starts(&s.take_actions(), &peers)[0];
        assert!(s.answered(id, Err("connection closed".into()), t0).is_ok());
        assert!(events(&s.take_actions())
            .into_iter()
            .any(|e| matches!(e, Event::TaskFailed { retry: true, .. })));
        s.assign(t0);
        assert_eq!(starts(&s.take_actions(), &peers).len(), 1, "it runs again");
    }

    #[test]
    fn a_task_that_failed_on_a_peer_runs_elsewhere_and_fails_the_job_at_its_limit() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 2, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let (id, _, p, _) = starts(&s.take_actions(), &peers)[0];
        assert_eq!(p, 0);
        s.answered(id, Ok(JobResponse::Failed("trap".into())), t0)
            .unwrap();
        s.take_actions();
        s.assign(t0);
        let (id, _, p, _) = starts(&s.take_actions(), &peers)[0];
        assert_eq!(p, 1, "peer 0 is free but the task failed there");
        s.answered(id, Ok(JobResponse::Failed("trap".into())), t0)
            .unwrap();
        // Failed on every live peer: any may take it again, until the budget is spent.
        s.assign(t0);
        let (id, ..) = starts(&s.take_actions(), &peers)[0];
        let stop = s.answered(id, Ok(JobResponse::Failed("trap".into())), t0);
        match stop {
            Err(Stop::Failed(reason)) => assert!(
                reason.contains(&format!("failed {TASK_FAILURES} times"))
                    && reason.contains("trap"),
                "{reason}"
            ),
            _ => panic!("the job must fail after {TASK_FAILURES} failures"),
        }
    }

    #[test]
    fn busy_is_not_an_attempt() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 1, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let (id, ..) = starts(&s.take_actions(), &peers)[0];
        s.answered(id, Ok(JobResponse::busy()), t0).unwrap();
        assert!(
            events(&s.take_actions()).is_empty(),
            "no failure is reported"
        );
        s.assign(t0);
        let again = s.take_actions();
        assert!(events(&again)
            .iter()
            .any(|e| matches!(e, Event::TaskStarted { attempt: 1, .. })));
        assert_eq!(s.tally.attempts[0], 1);
    }

    #[test]
    fn a_peer_that_misses_its_probe_loses_its_tasks_to_others() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 2, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let (id, _, p, _) = starts(&s.take_actions(), &peers)[0];
        assert_eq!(s.probe_targets(), vec![(p, peers[p])]);
        assert!(s.probe_targets().is_empty(), "one probe at a time");
        s.probed(p, false);
        assert_eq!(s.take_actions(), vec![Action::Abort(id)]);
        assert!(s.tally.gone.contains(&peers[p]));
        s.cancelled(id, at(t0, 10)).unwrap();
        let failed = s.take_actions();
        assert!(events(&failed).iter().any(|e| matches!(
            e,
            Event::TaskFailed { reason, retry: true, .. } if reason.contains("liveness probe")
        )));
        s.assign(at(t0, 10));
        let retried = starts(&s.take_actions(), &peers);
        assert_eq!(retried[0].2, 1 - p, "the other peer runs it");
    }

    #[test]
    fn the_coordinator_is_never_probed_and_an_answering_peer_keeps_its_tasks() {
        let mut f = Fixture::new(TaskKind::Reduce, 2, 2, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let me = peers[0];
        let mut s = f.state_connected(me, |_| true);
        s.assign(t0);
        s.take_actions();
        assert_eq!(s.probe_targets(), vec![(1, peers[1])]);
        s.probed(1, true);
        assert!(s.take_actions().is_empty());
        assert!(s.tally.gone.is_empty());
    }

    #[test]
    fn a_record_that_fails_its_task_twice_is_skipped() {
        let mut f = Fixture::new(TaskKind::Map, 1, 1, 1).with_local(vec![vec![100]]);
        f.skips = Skips::new(10);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        let bad = || {
            Ok(JobResponse::RecordFailed {
                reason: "trap at record 42".into(),
                record: 42,
            })
        };
        s.assign(t0);
        let (id, _, _, skip) = starts(&s.take_actions(), &peers)[0].clone();
        assert!(skip.is_empty());
        s.answered(id, bad(), t0).unwrap();
        s.assign(t0);
        let (id, _, _, skip) = starts(&s.take_actions(), &peers)[0].clone();
        assert!(skip.is_empty(), "one failure skips nothing");
        s.answered(id, bad(), t0).unwrap();
        assert!(events(&s.take_actions()).iter().any(|e| matches!(
            e,
            Event::TaskFailed { reason, .. } if reason.contains("skipping that record")
        )));
        s.assign(t0);
        let (id, _, _, skip) = starts(&s.take_actions(), &peers)[0].clone();
        assert_eq!(skip, vec![42]);
        // A fresh count of failures: two more do not fail the job.
        s.answered(id, Ok(JobResponse::Failed("other".into())), t0)
            .unwrap();
        s.assign(t0);
        let (id, ..) = starts(&s.take_actions(), &peers)[0].clone();
        s.answered(id, map_done(), t0).unwrap();
        assert!(s.is_done());
    }

    #[test]
    fn a_reducer_missing_runs_ends_its_task_without_blame() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 1, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        let mut s = f.state();
        s.assign(t0);
        let (id, ..) = starts(&s.take_actions(), &peers)[0];
        let run = RunRef {
            cid: *p2pmr_protocol::Block::raw(b"run".to_vec()).cid(),
            holder: peers[0].to_bytes(),
        };
        s.answered(id, Ok(JobResponse::MissingRuns(vec![run])), t0)
            .unwrap();
        assert!(s.is_done());
        assert!(s.tally.gone.is_empty());
        let done = s.into_done();
        assert!(matches!(done[0].1, JobResponse::MissingRuns(_)));
    }

    #[test]
    fn peers_gone_or_disconnected_take_no_tasks_and_none_left_is_stuck() {
        let mut f = Fixture::new(TaskKind::Reduce, 1, 2, 1);
        let (t0, peers) = (f.t0, f.peers.clone());
        f.gone.insert(peers[0]);
        let only = peers[1];
        let mut s = f.state_connected(PeerId::random(), move |p| *p != only);
        s.assign(t0);
        assert!(starts(&s.take_actions(), &peers).is_empty());
        assert!(matches!(s.stuck(), Some(Stop::Failed(_))));
    }
}
