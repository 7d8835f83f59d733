//! Times the Rust SDK's `get` over the socket and its cached `get`, as one JSON line, for
//! side-by-side runs with another SDK (`sdk/python/bench/get_bench.py` runs both against the
//! same konord, rounds interleaved).
//!
//! Usage: `get_latency SOCKET GROUP KEY SOCKET_GETS CACHED_BATCHES`; prints
//! `{"socket_p50_ns":..,"socket_p99_ns":..,"cached_ns":..}` (cached: the median of batches of
//! 1,000 gets, per get).

use std::time::Instant;

/// Cached gets timed together: one clock reading costs about as much as a cached get.
const CACHED_GETS_PER_BATCH: u32 = 1_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, group, key, gets, batches] = args.as_slice() else {
        return Err("usage: get_latency SOCKET GROUP KEY SOCKET_GETS CACHED_BATCHES".into());
    };
    let (gets, batches): (usize, usize) = (gets.parse()?, batches.parse()?);
    let client = konor_sdk::Client::connect(socket).await?;
    for _ in 0..gets / 10 {
        client.get(group, key).await?;
    }
    let mut samples = Vec::with_capacity(gets);
    for _ in 0..gets {
        let started = Instant::now();
        std::hint::black_box(client.get(group, key).await?);
        samples.push(started.elapsed().as_nanos());
    }
    samples.sort_unstable();
    let cached = client.cached(group).await?;
    let mut per_get = Vec::with_capacity(batches);
    for _ in 0..batches {
        let started = Instant::now();
        for _ in 0..CACHED_GETS_PER_BATCH {
            std::hint::black_box(cached.get(std::hint::black_box(key)));
        }
        per_get.push(started.elapsed().as_nanos() / u128::from(CACHED_GETS_PER_BATCH));
    }
    per_get.sort_unstable();
    let at = |sorted: &[u128], quantile: f64| sorted[((sorted.len() - 1) as f64 * quantile) as usize];
    println!(
        "{{\"socket_p50_ns\":{},\"socket_p99_ns\":{},\"cached_ns\":{}}}",
        at(&samples, 0.5),
        at(&samples, 0.99),
        at(&per_get, 0.5)
    );
    Ok(())
}
