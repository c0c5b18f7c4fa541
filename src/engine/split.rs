//! How the CPU forward splits a batch between its threads: a pure function
//! of the rows' sizes, tested without a model.
//!
//! Why split at all: the fused forward parallelizes *inside* every op
//! (matmul blocks, attention items, GELU chunks), so a 6-layer forward meets
//! a few hundred join points, and at each the threads wait for the slowest.
//! A thread that waits more than a few tens of microseconds sleeps (rayon's
//! workers park on a futex), and waking it again costs as much in a VM. On
//! a server the compute threads also share their CPUs with the HTTP
//! runtime, the tokenizer and, in benchmarks, the load generator: when one
//! thread is preempted, every other thread soon waits for it. Rows are
//! independent in the forward (each attends to its own prompt and tokens
//! only), so a batch can instead run as several whole forwards of a few
//! rows each, taken by the threads as they come free: a preempted thread
//! delays only its own chunk while the others take the rest, and inside a
//! chunk nobody waits.
//!
//! How small a chunk may be: `cargo bench --bench engine`, int8, AMX Xeon,
//! 2 threads, short rows (~45 positions with their prompts), ms per row,
//! splitting from 160 positions per chunk (4 short rows) against from 40
//! (one), two runs each (commit 9b855de): 4-row batches 0.76 / 0.81 → 0.56
//! / 0.58 quiet and 1.08 / 1.03 → 0.79 / 0.81 beside a process busy 25% of
//! one CPU; 8-row batches 0.69 / 0.74 → 0.52 / 0.60 and 1.03 / 0.98 → 0.65
//! / 0.64; 2 rows about even (0.93 → 0.84 / 0.92); 16 rows and more alike.
//! f32: 4 and 8 rows 14–17% less, the rest even. So a batch splits as soon
//! as each thread gets about one short row ([`SERVE`]`.least`), and no more
//! chunks are cut than ~160 positions each need ([`SERVE`]`.target`): one
//! row per chunk pays a forward's fixed costs per row and measured no
//! better for large batches (64 rows beside the busy process, before
//! 9b855de: 0.76 / 0.83 ms per row against 0.73 / 0.85). A lone row keeps
//! the intra-op split: on one thread it would take ~40% longer.
//!
//! The logits do not depend on the split: every kernel computes a row's
//! outputs from that row alone, in the same order whatever else is in the
//! batch (the engine tests check split and unsplit batches agree).

use std::ops::Range;

/// How a batch is cut into chunks: see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// The fewest positions (prompt + text) a chunk should hold: a batch
    /// with fewer than twice this stays one forward.
    pub least: usize,
    /// Positions per chunk when there are plenty: a large batch is cut
    /// into about `total / target` chunks (at least one per thread).
    pub target: usize,
}

/// The split the CPU serve path uses: from about one short sentence with
/// its prompt per chunk (40 positions), in chunks of up to ~4–5 of them
/// (160).
pub const SERVE: Split = Split {
    least: 40,
    target: 160,
};

/// Contiguous ranges of rows (in batch order) to run as separate forwards,
/// given each row's positions, the threads available and the chunk sizes.
/// One range covering every row when splitting would not pay: one thread,
/// one row, or fewer than `2 · split.least` positions. Otherwise about
/// `total / split.target` chunks, at least `threads` and at most what
/// `split.least` and the rows allow, cut where the running total of
/// positions comes nearest each equal share, so chunks carry similar work
/// (a batch arrives sorted by length: its longest rows last); never an
/// empty chunk.
pub fn chunks(positions: &[usize], threads: usize, split: Split) -> Vec<Range<usize>> {
    let rows = positions.len();
    let total: usize = positions.iter().sum();
    let most = total / split.least.max(1);
    if threads < 2 || rows < 2 || most < 2 {
        #[allow(clippy::single_range_in_vec_init)] // one chunk: every row
        return vec![0..rows];
    }
    let n = (total / split.target.max(1))
        .max(threads)
        .min(most)
        .min(rows);
    let half = (split.least / 2).max(1);
    let mut out = Vec::with_capacity(n);
    // `done`: positions in the chunks already cut; `chunk`: in this one.
    let (mut start, mut chunk, mut done) = (0, 0, 0);
    for (i, &p) in positions.iter().enumerate() {
        chunk += p;
        let left = n - out.len();
        if left < 2 {
            break; // the last chunk takes the rest
        }
        // This chunk's fair share of what is left (after a long row that
        // overshot its own, the rest is shared anew), never under `least`.
        let share = ((total - done) / left).max(split.least);
        let rest = total - done - chunk;
        // Cut after row i where the chunk is nearest its share (reached it,
        // or the next row would overshoot it by more than stopping here
        // falls short), and neither side of the cut is under half the least
        // chunk (a long row among short ones gets a chunk of its own, not
        // the short ones one each).
        let nearest = chunk >= share
            || positions
                .get(i + 1)
                .is_some_and(|&next| (chunk + next).saturating_sub(share) > share - chunk);
        if nearest && chunk >= half && rest >= half {
            out.push(start..i + 1);
            (start, done, chunk) = (i + 1, done + chunk, 0);
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
        assert_eq!(chunks(&[], 2, SERVE), whole(0));
        assert_eq!(chunks(&[40], 2, SERVE), whole(1));
        // Two very short rows: 30 positions, under two least chunks.
        assert_eq!(chunks(&[15, 15], 2, SERVE), whole(2));
        // Plenty of work but one thread.
        assert_eq!(chunks(&[45; 64], 1, SERVE), whole(64));
    }

    #[test]
    fn short_rows_split_as_soon_as_each_thread_gets_one() {
        assert_eq!(chunks(&[45, 45], 2, SERVE), vec![0..1, 1..2]);
        // 4 short rows: 180 positions, one target chunk's worth, but two
        // threads: two chunks.
        assert_eq!(chunks(&[45; 4], 2, SERVE), vec![0..2, 2..4]);
        // 8 rows of 45: 360 positions, two chunks of 4.
        assert_eq!(chunks(&[45; 8], 2, SERVE), vec![0..4, 4..8]);
        // Two long rows: one each.
        assert_eq!(chunks(&[300, 300], 2, SERVE), vec![0..1, 1..2]);
        // More threads than rows: one chunk per row at most.
        assert_eq!(chunks(&[200; 3], 8, SERVE), vec![0..1, 1..2, 2..3]);
        // More threads than least chunks: 200 positions make 5 of 40.
        assert_eq!(chunks(&[20; 10], 8, SERVE).len(), 5);
    }

    #[test]
    fn large_batches_split_by_work_into_balanced_chunks() {
        let pos: Vec<usize> = (0..64).map(|i| 20 + (i * 37) % 40).collect();
        let total: usize = pos.iter().sum();
        let r = chunks(&pos, 2, SERVE);
        check_cover(&r, pos.len());
        assert_eq!(r.len(), total / SERVE.target);
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
        assert_eq!(chunks(&pos, 2, SERVE), vec![0..9, 9..10]);
    }

    #[test]
    fn short_rows_after_a_huge_one_share_what_is_left() {
        // The huge row overshoots the first share; the short rows then go
        // in chunks of at least `least` positions, not one or two each.
        let mut pos = vec![10; 9];
        pos.insert(0, 5000);
        for threads in [2, 4, 16] {
            let r = chunks(&pos, threads, SERVE);
            check_cover(&r, pos.len());
            assert_eq!(r, vec![0..1, 1..5, 5..10], "{threads} threads");
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
            let split = Split {
                least: 1 + (seed >> 40) as usize % 100,
                target: 1 + (seed >> 30) as usize % 400,
            };
            check_cover(&chunks(&pos, threads, split), rows);
        }
    }
}
