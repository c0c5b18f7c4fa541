//! How the CPU forward splits a batch between its threads: a pure function
//! of the rows' sizes, tested without a model.
//!
//! Why split at all: the fused forward parallelizes *inside* every op
//! (matmul blocks, attention items, GELU chunks), so a 6-layer forward meets
//! a few hundred join points, and at each the threads wait for the slowest.
//! On a server the compute threads share their CPUs with the HTTP runtime,
//! the tokenizer and, in benchmarks, the load generator: when one thread is
//! preempted, every other thread soon waits for it. `cargo bench --bench
//! engine` with a process taking 25% of one of the 2 CPUs (AMX Xeon, int8):
//! a 64-row batch went from 0.72 to 1.09 ms per row, a one-row batch from
//! 1.45 to 1.40 — a preemption stalls the whole forward. Rows are
//! independent in the forward (each attends to its own prompt and tokens
//! only), so a large batch can instead run as several whole forwards of a
//! few rows each, taken by the threads as they come free: a preempted thread
//! delays only its own chunk while the others take the rest. Same bench:
//! 64-row batches 0.62 ms per row quiet and 0.77 under that load, 16-row
//! batches 0.75 → 0.63 quiet. Small batches keep the intra-op split: a few
//! rows alone on one thread would take twice as long.
//!
//! The logits do not depend on the split: every kernel computes a row's
//! outputs from that row alone, in the same order whatever else is in the
//! batch (the engine tests check split and unsplit batches agree).

use std::ops::Range;

/// Positions (prompt + text) a chunk should hold at least before a batch is
/// split: about 4–5 short sentences with their prompts. Chunks of ~8 short
/// rows ran as fast as 16 (and faster than one 64-row forward) in the bench
/// above; much smaller ones pay the per-forward fixed costs too often.
pub const CHUNK_POSITIONS: usize = 160;

/// Contiguous ranges of rows (in batch order) to run as separate forwards,
/// given each row's positions, the threads available and the least
/// positions per chunk. One range covering every row when splitting would
/// not pay: one thread, or fewer than two chunks' worth of positions.
/// Otherwise as many chunks as the positions allow (at least `threads`
/// where there are enough rows), cut where the running total of positions
/// comes nearest each equal share, so chunks carry similar work (a batch
/// arrives sorted by length: its longest rows last); never an empty chunk.
pub fn chunks(positions: &[usize], threads: usize, min_positions: usize) -> Vec<Range<usize>> {
    let rows = positions.len();
    let total: usize = positions.iter().sum();
    let by_work = total / min_positions.max(1);
    if threads < 2 || rows < 2 || by_work < 2 {
        #[allow(clippy::single_range_in_vec_init)] // one chunk: every row
        return vec![0..rows];
    }
    let n = by_work.max(threads).min(rows);
    let half = (min_positions / 2).max(1);
    let mut out = Vec::with_capacity(n);
    let (mut start, mut acc, mut chunk) = (0, 0, 0);
    for (i, &p) in positions.iter().enumerate() {
        acc += p;
        chunk += p;
        // Cut after row i where the running total is nearest the k-th equal
        // share (reached it, or the next row would overshoot it by more than
        // stopping here falls short), and neither side of the cut is under
        // half a chunk's worth (a long row among short ones gets a chunk of
        // its own, not the short ones one each).
        let k = out.len() + 1;
        let target = total * k / n;
        let nearest = acc >= target
            || positions
                .get(i + 1)
                .is_some_and(|&next| (acc + next).saturating_sub(target) > target - acc);
        if k < n && nearest && chunk >= half && total - acc >= half {
            out.push(start..i + 1);
            (start, chunk) = (i + 1, 0);
        }
    }
    out.push(start..rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(ranges: &[Range<usize>], rows: usize) {
        if rows == 0 {
            assert_eq!(ranges.len(), 1);
            assert!(ranges[0].is_empty());
            return;
        }
        let mut next = 0;
        for r in ranges {
            assert_eq!(r.start, next, "contiguous: {ranges:?}");
            assert!(r.end > r.start, "no empty chunk: {ranges:?}");
            next = r.end;
        }
        assert_eq!(next, rows, "every row once: {ranges:?}");
    }

    #[test]
    fn small_batches_and_one_thread_stay_whole() {
        let whole = |rows: usize| std::iter::once(0..rows).collect::<Vec<_>>();
        assert_eq!(chunks(&[], 2, 160), whole(0));
        assert_eq!(chunks(&[40], 2, 160), whole(1));
        // 4 short rows: 180 positions, under two chunks' worth.
        assert_eq!(chunks(&[45; 4], 2, 160), whole(4));
        // Plenty of work but one thread.
        assert_eq!(chunks(&[45; 64], 1, 160), whole(64));
    }

    #[test]
    fn enough_work_splits_at_least_per_thread() {
        // 8 rows of 45: 360 positions, two chunks of 4.
        assert_eq!(chunks(&[45; 8], 2, 160), vec![0..4, 4..8]);
        // Two long rows: one each.
        assert_eq!(chunks(&[300, 300], 2, 160), vec![0..1, 1..2]);
        // More threads than the work allows chunks for: one per row at most.
        let r = chunks(&[200; 3], 8, 160);
        assert_eq!(r, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn large_batches_split_by_work_into_balanced_chunks() {
        let pos: Vec<usize> = (0..64).map(|i| 20 + (i * 37) % 40).collect();
        let total: usize = pos.iter().sum();
        let r = chunks(&pos, 2, 160);
        check_cover(&r, pos.len());
        assert_eq!(r.len(), total / 160);
        let share = total / r.len();
        let most = pos.iter().max().unwrap();
        for c in &r {
            let w: usize = pos[c.clone()].iter().sum();
            assert!(
                w.abs_diff(share) <= 2 * most,
                "chunk {c:?} has {w}, share {share}"
            );
        }
    }

    #[test]
    fn a_long_last_row_gets_a_chunk_of_its_own() {
        // Sorted by length, as the batcher hands rows over.
        let mut pos = vec![10; 9];
        pos.push(5000);
        assert_eq!(chunks(&pos, 2, 160), vec![0..9, 9..10]);
    }

    #[test]
    fn one_huge_row_does_not_leave_empty_chunks() {
        let mut pos = vec![10; 9];
        pos.insert(0, 5000);
        for threads in [2, 4, 16] {
            let r = chunks(&pos, threads, 160);
            check_cover(&r, pos.len());
            assert_eq!(r, vec![0..1, 1..10], "the short rows together");
        }
    }

    #[test]
    fn any_sizes_cover_every_row_once() {
        let mut seed = 7u64;
        for _ in 0..500 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let rows = (seed >> 58) as usize;
            let pos: Vec<usize> = (0..rows)
                .map(|i| 1 + ((seed >> (i % 40)) as usize % 300))
                .collect();
            let threads = 1 + (seed >> 50) as usize % 8;
            check_cover(&chunks(&pos, threads, 160), rows);
        }
    }
}
