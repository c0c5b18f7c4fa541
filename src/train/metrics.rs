//! Classification metrics: accuracy, macro-F1 and the confusion matrix.

use serde::Serialize;

/// Metrics over one labeled set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// Examples scored.
    pub examples: usize,
    /// Share predicted correctly.
    pub accuracy: f64,
    /// Unweighted mean of the per-label F1 scores (a label never predicted
    /// and never present counts as F1 = 0, as scikit-learn's default).
    pub macro_f1: f64,
    /// Per label: precision, recall, F1, support.
    pub per_label: Vec<LabelScores>,
    /// `confusion[gold][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// Label names, in index order.
    pub labels: Vec<String>,
}

/// Scores of one label.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelScores {
    /// Correct among predictions of this label.
    pub precision: f64,
    /// Found among examples of this label.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Examples of this label.
    pub support: usize,
}

impl Metrics {
    /// Computes the metrics from gold and predicted label indices.
    pub fn compute(gold: &[usize], pred: &[usize], labels: &[String]) -> Self {
        assert_eq!(gold.len(), pred.len(), "one prediction per example");
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (&g, &p) in gold.iter().zip(pred) {
            confusion[g][p] += 1;
        }
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_label: Vec<LabelScores> = (0..k)
            .map(|i| {
                let tp = confusion[i][i];
                let support: usize = confusion[i].iter().sum();
                let predicted: usize = (0..k).map(|g| confusion[g][i]).sum();
                let precision = div(tp, predicted);
                let recall = div(tp, support);
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                LabelScores {
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let macro_f1 = if k == 0 {
            0.0
        } else {
            per_label.iter().map(|s| s.f1).sum::<f64>() / k as f64
        };
        Metrics {
            examples: gold.len(),
            accuracy: div(correct, gold.len()),
            macro_f1,
            per_label,
            confusion,
            labels: labels.to_vec(),
        }
    }

    /// A plain-text report: headline numbers, per-label scores, confusion matrix.
    pub fn report(&self) -> String {
        let w = self
            .labels
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "examples   {}\naccuracy   {:.4}\nmacro-F1   {:.4}\n\n{:<w$}  precision  recall  f1      support\n",
            self.examples, self.accuracy, self.macro_f1, "label"
        );
        for (l, sc) in self.labels.iter().zip(&self.per_label) {
            s += &format!(
                "{l:<w$}  {:<9.4}  {:<6.4}  {:<6.4}  {}\n",
                sc.precision, sc.recall, sc.f1, sc.support
            );
        }
        s += &format!("\nconfusion (rows: gold, columns: predicted)\n{:<w$}", "");
        let cw = self
            .confusion
            .iter()
            .flatten()
            .map(|n| n.to_string().len())
            .max()
            .unwrap_or(1)
            .max(w);
        for l in &self.labels {
            s += &format!("  {l:>cw$}");
        }
        s += "\n";
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            s += &format!("{l:<w$}");
            for n in row {
                s += &format!("  {n:>cw$}");
            }
            s += "\n";
        }
        s
    }
}
