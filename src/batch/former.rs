//! Which waiting rows ride together: a pure function of their costs, so the
//! policy is tested without threads or a model.
//!
//! The oldest row always goes (no row starves); the rows closest to it in
//! length join while the padded size (rows × longest) stays within the
//! token budget. Rows of similar length therefore share a batch and little
//! compute is spent on padding, whichever tasks they belong to.

/// Indices (into `costs`, which is in arrival order) of the rows of the next
/// batch, sorted by cost then arrival. `costs[0]` is the oldest row and is
/// always chosen, even when it alone exceeds `max_tokens`.
pub fn select(costs: &[usize], max_tokens: usize, max_rows: usize) -> Vec<usize> {
    let Some(&anchor) = costs.first() else {
        return Vec::new();
    };
    let mut by_distance: Vec<usize> = (1..costs.len()).collect();
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
    fn equal_distance_prefers_older_rows() {
        let costs = [10, 12, 8, 12, 8];
        let picked = select(&costs, 10_000, 3);
        assert_eq!(picked, vec![2, 0, 1]);
    }
}
