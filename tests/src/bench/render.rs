//! Rendering a report: BENCHMARKS.md and its chart.

use super::{FIXED_RATE, REPEAT, Report, Subject};

/// The report as BENCHMARKS.md.
pub fn markdown(report: &Report, chart: &str) -> String {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str(&format!(
        "Written by `cargo xtask bench{}` on Linux {}, {} CPUs. Every figure is a median of rounds; \
         the targets are ratios of figures taken in the same run (absolute figures drift \
         between runs on these machines, ratios much less).\n\n",
        if report.quick { " --quick" } else { "" },
        report.kernel,
        report.cpus
    ));
    md.push_str("## Targets\n\n| target | measured | bound | holds |\n|---|---|---|---|\n");
    for t in report.targets.values() {
        let measured = match t.ns {
            Some(ns) => format!("{ns:.0} ns"),
            None => format!("{:.2}", t.measured()),
        };
        let holds = match (t.bound.as_str(), t.holds) {
            ("floor", _) => "-",
            (_, true) => "yes",
            (_, false) => "**no**",
        };
        md.push_str(&format!(
            "| {} | {measured} | {} | {holds} |\n",
            t.name, t.bound
        ));
    }
    md.push_str(&format!(
        "\n## Per-packet cost (BPF_PROG_TEST_RUN, {REPEAT} repetitions a round)\n\n\
         | case | ns per packet | compared with | ratio |\n|---|---|---|---|\n"
    ));
    for m in &report.micro {
        md.push_str(&format!(
            "| {} | {:.1} | {} | {:.2} |\n",
            m.case, m.ns, m.baseline, m.ratio
        ));
    }
    md.push_str(
        "\nSingle runs (one BPF_PROG_TEST_RUN per packet, to give each SYN a connection of its \
         own) carry the kernel's per-run timing overhead; they are compared with the bare program \
         timed the same way.\n\n## Scale\n\n| tables | size | case | ns per packet |\n|---|---|---|---|\n",
    );
    for s in &report.scale {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} |\n",
            s.dimension, s.size, s.case, s.ns
        ));
    }
    md.push_str(&format!(
        "\n## SYN flood over a veth\n\nA generator (BPF_PROG_TEST_RUN live frames, XDP_TX) on one core \
         sends SYNs to port 25 of a server namespace whose receive path (threaded NAPI) is pinned to \
         the other core, with a listener on port 25. Highest rate: packets the server's core got \
         through per second, the generator at full speed. CPU: the share of the server's core the \
         receive path took at {FIXED_RATE} packets per second. Each measurement in fresh namespaces \
         (fresh conntrack); each figure the median of {} rounds, every subject in turn in each \
         round. Per source, every subject allows 20. `header_drop` reads the \
         Ethernet, IPv4 and TCP headers and drops every SYN to port 25, using no map: the \
         floor of any program that looks at a SYN, where bare XDP_DROP never touches the \
         frame. `cache_drop` also looks the SYN's refusal key up in a per-CPU array laid out \
         as the limiter's refusal cache, holding the sources the limiter holds at their caps, \
         and drops the SYNs it finds: in the flood from 256 sources, the floor of a refusal from \
         a per-CPU cache (in the one from 65,536 sources its cache is empty, and it reads a set's \
         slots for every new source, which the limiter's set bits skip). \
         `bare XDP_PASS` passes every frame unread: what attaching any XDP program \
         costs the packets it lets through, the floor of the flood that is mostly \
         admitted. In the program: the nanoseconds a packet spent in the subject's XDP \
         program at full speed, by the kernel's run-time statistics (BPF_ENABLE_STATS), in \
         a flood of its own, since they cost each run two clock reads; unlike \
         BPF_PROG_TEST_RUN's figures above, they include the cache misses of a flood.\n\n\
         ![flood results]({chart})\n\n\
         | sources | subject | highest rate (pps) | CPU at {FIXED_RATE} pps | in the program (ns a packet) |\n|---|---|---|---|---|\n",
        report.flood_rounds
    ));
    for f in &report.flood {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} % | {} |\n",
            f.sources,
            f.subject,
            f.max_pps,
            f.cpu_at_fixed_rate * 100.0,
            f.program_ns
                .map_or("-".to_string(), |ns| format!("{ns:.0}"))
        ));
    }
    md
}

/// The flood results as an SVG bar chart: the highest rate per subject,
/// for both source mixes.
pub fn chart_svg(report: &Report) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).expect("drawing");
        let subjects: Vec<String> = Subject::ALL.iter().map(|s| s.name().to_string()).collect();
        let top = report
            .flood
            .iter()
            .map(|f| f.max_pps / 1e6)
            .fold(0.1, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "SYN flood: highest rate handled on one core (Mpps)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..(subjects.len() as f64), 0.0..top)
            .expect("a chart");
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(subjects.len())
            .x_label_formatter(&|x| {
                subjects
                    .get(x.floor() as usize)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_desc("million packets per second")
            .draw()
            .expect("the mesh");
        for (mix, (sources, color)) in [(256u32, BLUE), (65_536u32, RED)].into_iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = Subject::ALL
                .iter()
                .enumerate()
                .filter_map(|(i, subject)| {
                    let f = report
                        .flood
                        .iter()
                        .find(|f| f.sources == sources && f.subject == subject.name())?;
                    let left = i as f64 + 0.1 + 0.4 * mix as f64;
                    Some(Rectangle::new(
                        [(left, 0.0), (left + 0.38, f.max_pps / 1e6)],
                        color.mix(0.7).filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .expect("bars")
                .label(format!("{sources} sources"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .expect("the legend");
        root.present().expect("the chart");
    }
    svg
}
