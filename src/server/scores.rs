//! Logits → the scored, sorted, cut label list of one input.

use super::api::{FunctionToApply, LabelScore};

/// Applies `function` to `logits`, pairs scores with `labels`, sorts by
/// score (descending; ties keep label order) and keeps the first `top_k`
/// (all when `None`).
pub fn rank(
    logits: &[f32],
    labels: &[String],
    function: FunctionToApply,
    top_k: Option<usize>,
) -> Vec<LabelScore> {
    let scores = apply(logits, function);
    let mut out: Vec<LabelScore> = labels
        .iter()
        .zip(scores)
        .map(|(label, score)| LabelScore {
            label: label.clone(),
            score,
        })
        .collect();
    // Stable sort: equal scores stay in head order.
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    if let Some(k) = top_k {
        out.truncate(k);
    }
    out
}

/// The score function, computed in f64 for a stable softmax.
pub fn apply(logits: &[f32], function: FunctionToApply) -> Vec<f32> {
    match function {
        FunctionToApply::None => logits.to_vec(),
        FunctionToApply::Sigmoid => logits
            .iter()
            .map(|&x| (1.0 / (1.0 + (-(x as f64)).exp())) as f32)
            .collect(),
        FunctionToApply::Softmax => {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let exps: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.iter().map(|e| (e / sum) as f32).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("L{i}")).collect()
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let s = apply(&[1.0, 2.0, 3.0], FunctionToApply::Softmax);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[0] < s[1] && s[1] < s[2]);
        assert!((s[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let s = apply(&[1000.0, 1000.0], FunctionToApply::Softmax);
        assert_eq!(s, vec![0.5, 0.5]);
    }

    #[test]
    fn sigmoid_and_none() {
        assert_eq!(apply(&[0.0], FunctionToApply::Sigmoid), vec![0.5]);
        assert_eq!(apply(&[-2.5, 7.0], FunctionToApply::None), vec![-2.5, 7.0]);
    }

    #[test]
    fn ranked_descending_and_cut() {
        let r = rank(
            &[0.1, 3.0, -1.0, 2.0],
            &labels(4),
            FunctionToApply::None,
            Some(2),
        );
        let names: Vec<_> = r.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(names, ["L1", "L3"]);
        assert_eq!(r[0].score, 3.0);
        let all = rank(
            &[0.1, 3.0, -1.0, 2.0],
            &labels(4),
            FunctionToApply::None,
            None,
        );
        assert_eq!(all.len(), 4);
        let big_k = rank(&[0.1, 3.0], &labels(2), FunctionToApply::Softmax, Some(10));
        assert_eq!(big_k.len(), 2);
    }

    #[test]
    fn ties_keep_label_order() {
        let r = rank(&[1.0, 1.0, 1.0], &labels(3), FunctionToApply::Softmax, None);
        let names: Vec<_> = r.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(names, ["L0", "L1", "L2"]);
    }
}
