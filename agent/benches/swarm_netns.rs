//! The swarm against the physical limit and against the uploader alone (issue 13), release
//! build, as root: `SHOAL_BENCH_HOSTS` hosts (default 16) and an uploader, each agent in
//! its own network namespace with its link shaped to `SHOAL_BENCH_MBIT` Mbit/s (default
//! 100) up and down by `tc`; one revision of `SHOAL_BENCH_MIB` MiB (default 256) of noise
//! through the swarm, then another of the same size with `transfer.from_peers = false`
//! (every host from the uploader), in the same run. Prints each host's time from the
//! deployment's creation to its fetch done, the last host's against S/B, and the bytes
//! the uploader sent, as markdown for docs/benchmarks.md.
//!
//! `bench/swarm-netns.sh` (it builds and runs this); the namespaces are deleted at the
//! end, whatever happens.

#[path = "../../tests/support/fleet.rs"]
mod fleet;
#[path = "../../tests/support/shaped.rs"]
mod shaped;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let hosts = env("SHOAL_BENCH_HOSTS", 16);
    let mib = env("SHOAL_BENCH_MIB", 256);
    let mbit = env("SHOAL_BENCH_MBIT", 100) as u32;
    let net = match shaped::ShapedNet::create("shoal-bench", 195, hosts + 1, mbit) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("the benchmark needs root, `ip` and `tc`: {why}");
            std::process::exit(2);
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let r = shaped::swarm_against_origin(tmp.path(), &net, mib << 20, mbit);
    drop(net);
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{hosts} hosts, a revision of {mib} MiB, every link {mbit} Mbit/s up and down; \
         S/B = {:.1} s\n",
        r.limit
    );
    println!(
        "| mode | last host | × S/B | first host | median host | uploader sent | × S | \
         false deaths seen, summed over agents |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (mode, run) in [("swarm", &r.swarm), ("uploader only", &r.origin_only)] {
        let mut times: Vec<f64> = run.per_host.iter().map(|(_, t)| *t).collect();
        times.sort_by(f64::total_cmp);
        println!(
            "| {mode} | {:.1} s | {:.2} | {:.1} s | {:.1} s | {:.0} MiB | {:.2} | {} |",
            run.last,
            run.last / r.limit,
            times[0],
            times[times.len() / 2],
            mb(run.uploader_sent),
            run.uploader_sent as f64 / r.bytes as f64,
            run.false_deaths_seen
        );
    }
    println!(
        "\nswarm / uploader only, time to the last host: {:.2}",
        r.swarm.last / r.origin_only.last
    );
    for (mode, run) in [("swarm", &r.swarm), ("uploader only", &r.origin_only)] {
        println!("\n{mode}, each link's rate by second (Mbit/s, every packet counted):\n");
        println!("| s | uploader sends | hosts receive, mean | lowest | hosts done |");
        println!("|---|---|---|---|---|");
        for r in shaped::timeline(run) {
            println!(
                "| {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                r.at, r.up, r.mean, r.low, r.done
            );
        }
    }
    println!("\nper host (s): swarm {:?}", r.swarm.per_host);
    println!("per host (s): uploader only {:?}", r.origin_only.per_host);
}
