use super::*;

/// Anonymous resident memory of this process, in KiB.
fn rss_anon_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn release_free_heap_gives_freed_small_chunks_back() {
    // 64 MiB in 1 KiB blocks (below glibc's mmap threshold, so they live in
    // the heap), touched; every block freed but one in each 64, so the heap
    // cannot shrink from its top and only trimming inside it helps.
    const BLOCK: usize = 1024;
    const N: usize = 64 * 1024;
    let mut blocks: Vec<Option<Box<[u8]>>> = (0..N)
        .map(|i| Some(vec![(i % 251) as u8; BLOCK].into_boxed_slice()))
        .collect();
    for (i, b) in blocks.iter_mut().enumerate() {
        if i % 64 != 0 {
            *b = None;
        }
    }
    let before = rss_anon_kib();
    assert!(release_free_heap(), "malloc_trim released nothing");
    let after = rss_anon_kib();
    eprintln!("RssAnon {before} KiB before release_free_heap, {after} KiB after");
    // At least half of the 63 MiB freed goes back (other tests of this
    // binary allocate meanwhile; the margin absorbs them).
    assert!(
        before - after > 32 * 1024,
        "RssAnon {before} KiB before, {after} KiB after release_free_heap"
    );
    // The blocks kept are intact.
    for (i, b) in blocks.iter().enumerate().filter(|(i, _)| i % 64 == 0) {
        assert!(b.as_ref().unwrap().iter().all(|x| *x == (i % 251) as u8));
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn glibc_takes_the_trim_threshold() {
    assert!(keep_free_heap_top());
}
