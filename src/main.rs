fn main() {
    println!("printloop");
}
