//! Writes a PNG grid of the first images of a shapes10 split, one row per ten images.
//!
//!     cargo run --release --example preview_shapes10 -- test 40 shapes10.png

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.first().map_or("test", String::as_str);
    let n: usize = args.get(1).map_or(Ok(40), |s| s.parse())?;
    let out = args.get(2).map_or("shapes10.png", String::as_str);
    let d = datafree::data::synthetic::generate(split, n)
        .ok_or_else(|| anyhow::anyhow!("unknown split '{split}' (train, test)"))?;
    let imgs: Vec<&[u8]> = d.pixels.chunks(3 * 32 * 32).collect();
    datafree::plot::save_grid(std::path::Path::new(out), &imgs, 32, 32, 10, 3)?;
    let names: Vec<&str> = d
        .labels
        .iter()
        .map(|&l| datafree::data::synthetic::CLASSES[l])
        .collect();
    for row in names.chunks(10) {
        println!("{}", row.join(" "));
    }
    println!("wrote {out}");
    Ok(())
}
