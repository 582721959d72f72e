//! criterion: address list vs scatterlist registration for the `bench sgl` scenarios.

use criterion::{Criterion, criterion_group, criterion_main};
use dmaplane_bench::sgl::{Input, Scenario, addrlist_register, sgtable_register};

fn sgl(c: &mut Criterion) {
    for scenario in Scenario::ALL {
        let input = Input::prepare(scenario);
        let mut g = c.benchmark_group(scenario.name());
        g.sample_size(10);
        g.bench_function("addrlist", |b| {
            b.iter(|| addrlist_register(std::hint::black_box(&input)))
        });
        g.bench_function("sgtable", |b| {
            b.iter(|| sgtable_register(std::hint::black_box(&input)))
        });
        g.finish();
    }
}

criterion_group!(benches, sgl);
criterion_main!(benches);
