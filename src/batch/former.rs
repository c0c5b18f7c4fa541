//! Which waiting rows ride together: a pure function of their costs, so the
//! policy is tested without threads or a model.
//!
//! The oldest row always goes (no row starves); the rows closest to it in
//! length join while the padded size (rows × longest) stays within the
//! token budget. Rows of similar length therefore share a batch and little
//! compute is spent on padding, whichever tasks they belong to.
//!
//! [`BatchPolicy::OneTask`] is the same choice among the rows of the oldest
//! row's task only: what a server that cannot mix tasks in a forward pass
//! would do. It exists so that bench/online.sh can measure what mixing buys
//! on the real server; nothing should serve with it.

/// Which waiting rows may share a forward pass (`serve --batch-policy`,
/// hidden: a benchmark switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BatchPolicy {
    /// Rows of any task ride together (the server's policy).
    #[default]
    Mixed,
    /// Only rows of the oldest row's task join its batch: the baseline of
    /// bench/online.sh.
    OneTask,
}

/// Indices (into `costs`, which is in arrival order) of the rows of the next
/// batch, sorted by cost then arrival. `costs[0]` is the oldest row and is
/// always chosen, even when it alone exceeds `max_tokens`.
pub fn select(costs: &[usize], max_tokens: usize, max_rows: usize) -> Vec<usize> {
    select_among(costs, 1..costs.len(), max_tokens, max_rows)
}

/// [`select`] restricted to the rows whose task equals the oldest row's
/// (`tasks[i]` is row `i`'s task; rows past the shorter slice are never
/// chosen, so a mismatch cannot index out of bounds). The oldest row still
/// always goes, so no task starves: every task reaches the head of the
/// queue in arrival order.
pub fn select_one_task<T: PartialEq>(
    costs: &[usize],
    tasks: &[T],
    max_tokens: usize,
    max_rows: usize,
) -> Vec<usize> {
    let Some(first) = tasks.first() else {
        return Vec::new();
    };
    let n = costs.len().min(tasks.len());
    let same_task = (1..n).filter(|&i| tasks[i] == *first);
    select_among(&costs[..n], same_task, max_tokens, max_rows)
}

/// The rows of the next batch under `policy`: [`select`] or
/// [`select_one_task`].
pub fn select_with<T: PartialEq>(
    policy: BatchPolicy,
    costs: &[usize],
    tasks: &[T],
    max_tokens: usize,
    max_rows: usize,
) -> Vec<usize> {
    match policy {
        BatchPolicy::Mixed => select(costs, max_tokens, max_rows),
        BatchPolicy::OneTask => select_one_task(costs, tasks, max_tokens, max_rows),
    }
}

/// The oldest row plus those of `candidates` (indices into `costs`, each
/// above 0 and listed once) closest to it in length that fit the budget.
fn select_among(
    costs: &[usize],
    candidates: impl Iterator<Item = usize>,
    max_tokens: usize,
    max_rows: usize,
) -> Vec<usize> {
    let Some(&anchor) = costs.first() else {
        return Vec::new();
    };
    let mut by_distance: Vec<usize> = candidates.filter(|&i| i > 0 && i < costs.len()).collect();
    by_distance.sort_by_key(|&i| (costs[i].abs_diff(anchor), i));
    let mut picked = vec![0];
    let mut longest = anchor;
    for i in by_distance {
        if picked.len() >= max_rows.max(1) {
            break;
        }
        let l = longest.max(costs[i]);
        if l * (picked.len() + 1) <= max_tokens {
            picked.push(i);
            longest = l;
        }
    }
    picked.sort_by_key(|&i| (costs[i], i));
    picked
}

/// Padded positions of a batch with these costs (what the budget bounds).
pub fn padded_tokens(costs: impl IntoIterator<Item = usize>) -> usize {
    let (n, longest) = costs
        .into_iter()
        .fold((0, 0), |(n, l), c| (n + 1, l.max(c)));
    n * longest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(costs: &[usize], picked: &[usize]) -> usize {
        padded_tokens(picked.iter().map(|&i| costs[i]))
    }

    #[test]
    fn empty_queue_gives_empty_batch() {
        assert!(select(&[], 100, 8).is_empty());
    }

    #[test]
    fn oldest_row_always_runs_even_over_budget() {
        assert_eq!(select(&[500, 10, 10], 100, 8), vec![0]);
    }

    #[test]
    fn everything_fits_when_the_budget_allows() {
        let costs = [10, 20, 30, 40];
        let picked = select(&costs, 1000, 8);
        assert_eq!(picked, vec![0, 1, 2, 3]);
    }

    #[test]
    fn rows_of_similar_length_ride_with_the_oldest() {
        // Oldest is 20 tokens; the 100-token rows would force padding.
        let costs = [20, 100, 21, 100, 19, 22];
        let picked = select(&costs, 4 * 22, 8);
        assert_eq!(picked, vec![4, 0, 2, 5]);
        assert!(padded(&costs, &picked) <= 4 * 22);
    }

    #[test]
    fn budget_and_row_cap_hold() {
        let costs: Vec<usize> = (0..100).map(|i| 10 + (i * 7) % 50).collect();
        for budget in [50, 200, 1000, 5000] {
            for rows in [1, 4, 32] {
                let picked = select(&costs, budget, rows);
                assert!(picked.contains(&0));
                assert!(picked.len() <= rows);
                assert!(
                    picked.len() == 1 || padded(&costs, &picked) <= budget,
                    "budget {budget} rows {rows}"
                );
                let mut seen = picked.clone();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), picked.len(), "no row twice");
            }
        }
    }

    #[test]
    fn result_is_sorted_by_length() {
        let costs = [30, 10, 50, 20, 40];
        let picked = select(&costs, 10_000, 8);
        let lens: Vec<usize> = picked.iter().map(|&i| costs[i]).collect();
        assert_eq!(lens, vec![10, 20, 30, 40, 50]);
    }

    #[test]
    fn one_task_takes_only_the_oldest_rows_task() {
        let costs = [20, 20, 21, 19, 20, 22];
        let tasks = ["a", "b", "a", "c", "a", "b"];
        let picked = select_one_task(&costs, &tasks, 10_000, 8);
        assert_eq!(picked, vec![0, 4, 2]);
    }

    #[test]
    fn one_task_alone_when_no_other_row_shares_its_task() {
        let costs = [20, 20, 20];
        let picked = select_one_task(&costs, &["a", "b", "c"], 10_000, 8);
        assert_eq!(picked, vec![0]);
        // The oldest row runs even over budget, as with the mixed policy.
        assert_eq!(select_one_task(&[500, 10], &["a", "a"], 100, 8), vec![0]);
    }

    #[test]
    fn one_task_keeps_budget_row_cap_and_length_order() {
        let costs: Vec<usize> = (0..100).map(|i| 10 + (i * 7) % 50).collect();
        let tasks: Vec<usize> = (0..100).map(|i| i % 3).collect();
        for budget in [50, 200, 1000, 5000] {
            for rows in [1, 4, 32] {
                let picked = select_one_task(&costs, &tasks, budget, rows);
                assert!(picked.contains(&0));
                assert!(picked.len() <= rows);
                assert!(picked.iter().all(|&i| tasks[i] == tasks[0]));
                assert!(
                    picked.len() == 1 || padded(&costs, &picked) <= budget,
                    "budget {budget} rows {rows}"
                );
                let lens: Vec<usize> = picked.iter().map(|&i| costs[i]).collect();
                assert!(lens.windows(2).all(|w| w[0] <= w[1]), "sorted by length");
            }
        }
    }

    #[test]
    fn one_task_with_a_single_task_is_the_mixed_choice() {
        let costs = [20, 100, 21, 100, 19, 22];
        assert_eq!(
            select_one_task(&costs, &[7; 6], 4 * 22, 8),
            select(&costs, 4 * 22, 8)
        );
    }

    #[test]
    fn one_task_ignores_rows_without_a_task() {
        // A tasks slice shorter than costs never yields an index past it.
        assert_eq!(
            select_one_task(&[10, 10, 10], &["a", "a"], 1000, 8),
            vec![0, 1]
        );
        assert!(select_one_task::<&str>(&[10, 10], &[], 1000, 8).is_empty());
    }

    #[test]
    fn policy_switch_picks_the_function() {
        let costs = [20, 20, 20];
        let tasks = ["a", "b", "a"];
        assert_eq!(
            select_with(BatchPolicy::Mixed, &costs, &tasks, 1000, 8),
            vec![0, 1, 2]
        );
        assert_eq!(
            select_with(BatchPolicy::OneTask, &costs, &tasks, 1000, 8),
            vec![0, 2]
        );
    }

    #[test]
    fn equal_distance_prefers_older_rows() {
        let costs = [10, 12, 8, 12, 8];
        let picked = select(&costs, 10_000, 3);
        assert_eq!(picked, vec![2, 0, 1]);
    }
}
