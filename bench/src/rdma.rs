//! `dmaplane bench rdma`: simulated RDMA WRITE bandwidth by message size against this machine's
//! memcpy measured in the same run, the 64 B message rate on one queue pair, and revoke latency
//! under load.
