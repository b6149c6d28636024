//! Airlock's egress policy (`airlock run --net egress --allow-out/--deny-out`).

pub mod policy;
