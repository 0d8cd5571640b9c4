// The tests of this package that drive kubectl use the same `cfg(kubectl)` as the test
// kit's: see testkit/build.rs.
include!("testkit/build.rs");
