//! Benchmark scenarios shared by the criterion benches and the `dmaplane bench` harness, so both
//! measure exactly the same work.

pub mod agent;
pub mod blocks;
pub mod p2p;
pub mod rdma;
pub mod rounds;
pub mod sgl;
pub mod storage;
