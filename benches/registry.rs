//! Registry benchmark (being written).
fn main() {}
