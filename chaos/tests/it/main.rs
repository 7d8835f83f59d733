//! konor-chaos integration tests: the CI smoke of the chaos suite.

mod smoke;
