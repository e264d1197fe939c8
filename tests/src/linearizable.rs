//! A linearizability checker, and the model the fault test drives.
//!
//! [`check`] is Wing and Gong's search with Lowe's memoisation, as
//! Porcupine implements it: walk the history's calls and returns in time
//! order; at each call, try to linearize that operation now (the model must
//! accept its output from the current state, and the pair of "operations
//! linearized so far" and "state" must be new); at a return whose operation
//! is not linearized yet, undo the latest choice. The history is
//! linearizable when every operation has been placed.
//!
//! An operation whose outcome the client never learned (a timeout, a
//! connection lost mid-call) has no return: it may take effect at any time
//! after its call, or never. One that failed for certain is left out of
//! the history by the caller; it must not have taken effect.
//!
//! [`GrowSet`] is the model: a set of names that clients add to and read
//! whole (the fault test's apps). [`Anomalies`] counts, beside the
//! verdict, the three ways such a history goes wrong that a person can act
//! on: a write acknowledged and then missing from a later read (`lost`), a
//! name read that nobody added (`phantom`), and a read missing a name that
//! an earlier read, finished before it began, had shown (`stale_reads`).

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;
    fn init(&self) -> Self::State;
    /// The state after `input` from `state`, if the operation could have
    /// returned `output` there (`None`: the outcome is unknown).
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;
}

/// One operation as a client saw it. Times are in any one clock's units.
#[derive(Clone, Debug)]
pub struct Operation<I, O> {
    pub client: usize,
    pub input: I,
    /// What it returned; `None` when the client never learned.
    pub output: Option<O>,
    pub call: u64,
    /// When it returned; `None` when the client never learned.
    pub ret: Option<u64>,
}

/// Why a history is not linearizable, or could not be shown to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// No order works. `stuck` is the operation (an index into the history)
    /// that could not be placed at the deepest point the search reached.
    NotLinearizable { stuck: usize, placed: usize },
    /// The search took more than its budget of steps.
    Undecided { steps: u64 },
}

/// Whether `history` is linearizable under `model` (with the number of
/// steps the search took); the search gives up (as [`Failure::Undecided`])
/// after `budget` steps.
pub fn check<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>], budget: u64) -> Result<u64, Failure> {
    let mut list = Events::new(history);
    let mut linearized = Bits::new(history.len());
    let mut seen: HashSet<(Bits, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = list.next[HEAD];
    let (mut deepest, mut stuck) = (0, 0);
    let mut steps = 0u64;
    while list.next[HEAD] != list.tail {
        steps += 1;
        // The memo grows by at most one entry a step; bound it too.
        if steps > budget || seen.len() > MAX_MEMO {
            return Err(Failure::Undecided { steps });
        }
        let op = list.op[entry];
        if list.is_call(entry) {
            let operation = &history[op];
            if let Some(after) = model.step(&state, &operation.input, operation.output.as_ref()) {
                linearized.set(op, true);
                if seen.insert((linearized.clone(), after.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, after)));
                    list.lift(entry);
                    entry = list.next[HEAD];
                    continue;
                }
                linearized.set(op, false);
            }
            entry = list.next[entry];
        } else {
            // A return (or the end of the list): the operation it ends had to
            // be placed before anything that follows. Undo the last choice.
            if stack.len() >= deepest {
                (deepest, stuck) = (stack.len(), op);
            }
            let Some((call, before)) = stack.pop() else {
                return Err(Failure::NotLinearizable { stuck, placed: deepest });
            };
            state = before;
            linearized.set(list.op[call], false);
            list.unlift(call);
            entry = list.next[call];
        }
    }
    Ok(steps)
}

const HEAD: usize = 0;
/// At most this many (placed, state) pairs are remembered (a few GiB at
/// worst for the fault test's histories).
const MAX_MEMO: usize = 2_000_000;

/// The calls and returns in time order, as a doubly linked list that
/// operations are lifted out of and put back into.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The operation each event belongs to.
    op: Vec<usize>,
    /// For a call, its return event; for a return, `usize::MAX`.
    matching: Vec<usize>,
    tail: usize,
}

impl Events {
    fn new<I, O>(history: &[Operation<I, O>]) -> Events {
        // (time, 0 for a call / 1 for a return, operation): a call and a
        // return at the same instant count as overlapping.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(history.len() * 2);
        for (i, operation) in history.iter().enumerate() {
            events.push((operation.call, 0, i));
            events.push((operation.ret.unwrap_or(u64::MAX), 1, i));
        }
        events.sort_unstable();
        let count = events.len() + 2;
        let tail = count - 1;
        let mut list = Events {
            next: (1..=count).collect(),
            prev: (0..count).map(|i| i.saturating_sub(1)).collect(),
            op: vec![0; count],
            matching: vec![usize::MAX; count],
            tail,
        };
        let mut call_of = vec![0; history.len()];
        for (position, (_, kind, op)) in events.iter().enumerate() {
            let node = position + 1;
            list.op[node] = *op;
            if *kind == 0 {
                call_of[*op] = node;
            } else {
                list.matching[call_of[*op]] = node;
            }
        }
        // The tail stands for "no more events": reaching it acts as a return.
        list.op[tail] = history.len().saturating_sub(1);
        list
    }

    fn is_call(&self, node: usize) -> bool {
        node != self.tail && self.matching[node] != usize::MAX
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.matching[call]);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(self.matching[call]);
        self.relink(call);
    }
}

/// A fixed-size set of small integers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Bits(Vec<u64>);

impl Bits {
    pub fn new(size: usize) -> Bits {
        Bits(vec![0; size.div_ceil(64)])
    }

    pub fn set(&mut self, i: usize, on: bool) {
        if i / 64 >= self.0.len() {
            self.0.resize(i / 64 + 1, 0);
        }
        let bit = 1u64 << (i % 64);
        if on {
            self.0[i / 64] |= bit;
        } else {
            self.0[i / 64] &= !bit;
        }
    }

    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|word| word & (1 << (i % 64)) != 0)
    }

    fn trimmed(&self) -> &[u64] {
        let used = self.0.iter().rposition(|w| *w != 0).map_or(0, |i| i + 1);
        &self.0[..used]
    }

    /// Set-wise equality, whatever the sizes.
    pub fn same(&self, other: &Bits) -> bool {
        self.trimmed() == other.trimmed()
    }
}

/// A grow-only set of elements `0..n`: add one, or read them all.
pub struct GrowSet;

#[derive(Clone, Debug)]
pub enum SetInput {
    Add(usize),
    Read,
}

#[derive(Clone, Debug)]
pub enum SetOutput {
    Added,
    Read(Bits),
}

impl Model for GrowSet {
    type State = Bits;
    type Input = SetInput;
    type Output = SetOutput;

    fn init(&self) -> Bits {
        Bits::default()
    }

    fn step(&self, state: &Bits, input: &SetInput, output: Option<&SetOutput>) -> Option<Bits> {
        match (input, output) {
            (SetInput::Add(element), None | Some(SetOutput::Added)) => {
                let mut after = state.clone();
                after.set(*element, true);
                Some(after)
            }
            (SetInput::Read, None) => Some(state.clone()),
            (SetInput::Read, Some(SetOutput::Read(seen))) => seen.same(state).then(|| state.clone()),
            (SetInput::Add(_), Some(SetOutput::Read(_))) | (SetInput::Read, Some(SetOutput::Added)) => None,
        }
    }
}

/// Leaves out adds whose outcome is unknown and whose element no read
/// shows: such an add may be placed after everything else, where it changes
/// nothing a client saw, so the verdict is the same without it and the
/// search does not have to try every subset of them.
pub fn drop_unobserved(history: Vec<Operation<SetInput, SetOutput>>) -> Vec<Operation<SetInput, SetOutput>> {
    let mut observed = Bits::default();
    for operation in &history {
        if let Some(SetOutput::Read(seen)) = &operation.output {
            for (i, word) in seen.0.iter().enumerate() {
                if i >= observed.0.len() {
                    observed.0.resize(i + 1, 0);
                }
                observed.0[i] |= word;
            }
        }
    }
    history
        .into_iter()
        .filter(|op| !matches!((&op.input, &op.output), (SetInput::Add(e), None) if !observed.get(*e)))
        .collect()
}

/// What went wrong in a [`GrowSet`] history, counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Anomalies {
    /// Elements whose add was acknowledged and that a read begun after the
    /// acknowledgement did not show.
    pub lost: usize,
    /// Elements a read showed that no add could have put there: never
    /// added, or added only after the read had returned.
    pub phantom: usize,
    /// Reads that miss an element a read finished before they began showed.
    pub stale_reads: usize,
}

/// Counts [`Anomalies`]. `elements` is how many elements there are; an
/// element with no add in the history was never attempted (or failed for
/// certain), so any read of it is a phantom.
pub fn anomalies(history: &[Operation<SetInput, SetOutput>], elements: usize) -> Anomalies {
    let mut acked = vec![u64::MAX; elements];
    let mut invoked = vec![u64::MAX; elements];
    let mut first_seen = vec![u64::MAX; elements];
    let reads: Vec<(&Bits, u64, u64)> = history
        .iter()
        .filter_map(|op| match (&op.output, op.ret) {
            (Some(SetOutput::Read(seen)), Some(ret)) => Some((seen, op.call, ret)),
            _ => None,
        })
        .collect();
    for op in history {
        if let SetInput::Add(e) = op.input {
            if e < elements {
                invoked[e] = invoked[e].min(op.call);
                if op.output.is_some() {
                    acked[e] = acked[e].min(op.ret.unwrap_or(u64::MAX));
                }
            }
        }
    }
    for (seen, _, ret) in &reads {
        for (e, first) in first_seen.iter_mut().enumerate() {
            if seen.get(e) {
                *first = (*first).min(*ret);
            }
        }
    }
    let mut found = Anomalies::default();
    let mut lost = vec![false; elements];
    let mut phantom = vec![false; elements];
    // Elements beyond those known: nobody added them.
    let mut unknown = HashSet::new();
    for (seen, call, ret) in &reads {
        let mut stale = false;
        for e in 0..elements {
            if seen.get(e) {
                phantom[e] |= invoked[e] > *ret;
            } else {
                lost[e] |= acked[e] < *call;
                stale |= first_seen[e] < *call;
            }
        }
        unknown.extend((elements..seen.0.len() * 64).filter(|e| seen.get(*e)));
        found.stale_reads += usize::from(stale);
    }
    found.lost = lost.iter().filter(|l| **l).count();
    found.phantom = phantom.iter().filter(|p| **p).count() + unknown.len();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(client: usize, element: usize, call: u64, ret: Option<u64>) -> Operation<SetInput, SetOutput> {
        let output = ret.map(|_| SetOutput::Added);
        Operation { client, input: SetInput::Add(element), output, call, ret }
    }

    fn read(client: usize, seen: &[usize], call: u64, ret: u64) -> Operation<SetInput, SetOutput> {
        let mut bits = Bits::default();
        for e in seen {
            bits.set(*e, true);
        }
        Operation { client, input: SetInput::Read, output: Some(SetOutput::Read(bits)), call, ret: Some(ret) }
    }

    fn linearizable(history: &[Operation<SetInput, SetOutput>]) -> bool {
        check(&GrowSet, history, 1_000_000).is_ok()
    }

    #[test]
    fn a_sequential_history_that_follows_the_model_is_linearizable() {
        let history = [add(0, 0, 0, Some(1)), read(0, &[0], 2, 3), add(0, 1, 4, Some(5)), read(0, &[0, 1], 6, 7)];
        assert!(linearizable(&history));
        assert_eq!(anomalies(&history, 2), Anomalies::default());
    }

    #[test]
    fn a_read_overlapping_an_add_may_see_it_or_not() {
        let with = [add(0, 0, 0, Some(10)), read(1, &[0], 2, 3)];
        let without = [add(0, 0, 0, Some(10)), read(1, &[], 2, 3)];
        assert!(linearizable(&with));
        assert!(linearizable(&without));
    }

    #[test]
    fn an_acknowledged_add_missing_from_a_later_read_is_lost() {
        let history = [add(0, 0, 0, Some(1)), read(1, &[], 2, 3)];
        assert!(!linearizable(&history));
        assert_eq!(anomalies(&history, 1), Anomalies { lost: 1, ..Default::default() });
    }

    #[test]
    fn an_element_nobody_added_is_a_phantom() {
        let history = [add(0, 0, 0, Some(1)), read(1, &[0, 1], 2, 3)];
        assert!(!linearizable(&history));
        assert_eq!(anomalies(&history, 1), Anomalies { phantom: 1, ..Default::default() });
        // And one read before its add began.
        let early = [read(1, &[0], 0, 1), add(0, 0, 2, Some(3))];
        assert!(!linearizable(&early));
        assert_eq!(anomalies(&early, 1), Anomalies { phantom: 1, ..Default::default() });
    }

    #[test]
    fn a_read_that_goes_back_in_time_is_stale() {
        // The add never returned, so it is not lost; but once one read has
        // shown it, a later read must too.
        let history = [add(0, 0, 0, None), read(1, &[0], 1, 2), read(2, &[], 3, 4)];
        assert!(!linearizable(&history));
        assert_eq!(anomalies(&history, 1), Anomalies { stale_reads: 1, ..Default::default() });
    }

    #[test]
    fn an_add_whose_outcome_is_unknown_may_take_effect_late_or_never() {
        let late = [add(0, 0, 0, None), read(1, &[], 1, 2), read(1, &[0], 3, 4)];
        let never = [add(0, 0, 0, None), read(1, &[], 1, 2), read(1, &[], 3, 4)];
        assert!(linearizable(&late));
        assert!(linearizable(&never));
        assert!(linearizable(&drop_unobserved(never.to_vec())));
        assert_eq!(drop_unobserved(never.to_vec()).len(), 2);
        assert_eq!(drop_unobserved(late.to_vec()).len(), 3);
    }

    #[test]
    fn reads_that_disagree_on_order_are_caught_though_each_element_alone_is_fine() {
        // x is acknowledged before y is even called, so no read may show y
        // without x; each element's own history is fine, and no count above
        // sees it: only the search does.
        let history = [add(0, 0, 0, Some(10)), add(1, 1, 11, Some(12)), read(2, &[1], 5, 13)];
        assert!(!linearizable(&history));
        assert_eq!(anomalies(&history, 2), Anomalies::default());
        // Two concurrent reads seeing the adds in opposite orders.
        let crossed = [
            add(0, 0, 0, Some(20)),
            add(1, 1, 0, Some(20)),
            read(2, &[0], 1, 30),
            read(3, &[1], 1, 30),
            read(2, &[0, 1], 31, 32),
        ];
        assert!(!linearizable(&crossed));
    }

    #[test]
    fn concurrent_clients_with_overlapping_operations_are_ordered_when_an_order_exists() {
        let history = [
            add(0, 0, 0, Some(5)),
            add(1, 1, 1, Some(6)),
            read(2, &[1], 2, 4),
            read(3, &[0, 1], 3, 7),
            add(0, 2, 8, None),
            read(1, &[0, 1, 2], 9, 10),
            read(2, &[0, 1, 2], 11, 12),
        ];
        assert!(linearizable(&history));
        assert_eq!(anomalies(&history, 3), Anomalies::default());
    }

    #[test]
    fn many_unobserved_unknown_adds_do_not_blow_up_the_search() {
        let mut history = Vec::new();
        for e in 0..40 {
            history.push(add(e, e, 0, None));
        }
        for r in 0..200 {
            history.push(read(100, &[], 1 + 2 * r, 2 + 2 * r));
        }
        assert!(check(&GrowSet, &drop_unobserved(history), 100_000).is_ok());
    }

    #[test]
    fn the_search_gives_up_at_its_budget_rather_than_running_on() {
        let history = [add(0, 0, 0, Some(1)), read(1, &[0], 2, 3)];
        assert_eq!(check(&GrowSet, &history, 1), Err(Failure::Undecided { steps: 2 }));
    }
}
