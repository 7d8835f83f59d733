//! konorctl: the Konorkestra command-line tool.
fn main() {}
